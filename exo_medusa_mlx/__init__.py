"""Medusa speculative decoding on MLX (and PyTorch), packaged for exo.

Importing the package first gives MLX an optimized BLAS on Linux, so import it
before ``mlx``. The MLX API (``load``, ``generate``, ``stream_generate``) loads on
first use, so ``exo_medusa_mlx.torch_compat`` works on machines without MLX.
"""

from ._blas import preload_blas as _preload

_preload()

__version__ = "0.1.0"
__all__ = ["load", "generate", "stream_generate", "GenerationResponse", "__version__"]


def __getattr__(name: str):
    if name == "load":
        from .loading import load

        return load
    if name in ("generate", "stream_generate", "GenerationResponse"):
        from . import generate as _g

        return getattr(_g, name)
    raise AttributeError(f"module 'exo_medusa_mlx' has no attribute '{name}'")
