"""``mlx_medusa server``: an OpenAI-compatible streaming HTTP server with Medusa decoding.

``schema`` checks request bodies, ``scheduler`` runs one model on one worker thread,
decoding the requests in one batch (``core.batch_generation``) with a bounded queue,
``responses`` builds OpenAI's response shapes, ``app`` is the Starlette API and
``main`` the command (uvicorn serves it).
"""

from .app import Settings, create_app
from .scheduler import Scheduler

__all__ = ["Scheduler", "Settings", "create_app"]
