"""Medusa in exo 1.x (MLX runners): ``install()``, and ``mlx_medusa exo1`` which runs exo after it.

Importing this package imports nothing of exo; ``install()`` and the modules it loads
(``choose``, ``engine``) run inside exo's environment (Python 3.13, exo installed).
"""

from .install import Installation, install

__all__ = ["Installation", "install"]
