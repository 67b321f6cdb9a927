"""Medusa speculative decoding on MLX (and PyTorch), packaged for exo.

Importing the package first gives MLX an optimized BLAS on Linux, so import it
before ``mlx``. The MLX API (``load``, ``generate``, ``stream_generate``,
``batch_generate``, ``BatchGenerator``) loads on first use, so
``exo_medusa_mlx.torch_compat`` works on machines without MLX.
"""

from ._blas import preload_blas as _preload

_preload()

__version__ = "0.1.0"
__all__ = ["load", "generate", "stream_generate", "batch_generate", "BatchGenerator", "GenerationResponse",
           "__version__"]


def __getattr__(name: str):
    # Loaded on first use; the functions then replace the same-named submodules as
    # package attributes (as in mlx_lm, where ``generate`` is both).
    if name in ("load", "generate", "stream_generate", "batch_generate", "BatchGenerator", "GenerationResponse"):
        import importlib

        gen = importlib.import_module(".core.generation", __name__)
        batch = importlib.import_module(".core.batch_generation", __name__)
        globals().update(load=importlib.import_module(".loading", __name__).load, generate=gen.generate,
                         stream_generate=gen.stream_generate, GenerationResponse=gen.GenerationResponse,
                         batch_generate=batch.batch_generate, BatchGenerator=batch.BatchGenerator)
        return globals()[name]
    raise AttributeError(f"module 'exo_medusa_mlx' has no attribute '{name}'")
