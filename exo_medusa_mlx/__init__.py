"""Medusa speculative decoding on MLX (and PyTorch), packaged for exo.

Importing the package first gives MLX an optimized BLAS on Linux, so import it
before ``mlx``.
"""

from ._blas import preload_blas as _preload

_preload()

__version__ = "0.1.0"

from .generate import GenerationResponse, generate, stream_generate  # noqa: E402
from .loading import load  # noqa: E402

__all__ = ["load", "generate", "stream_generate", "GenerationResponse", "__version__"]
