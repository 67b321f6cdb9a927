"""Medusa speculative decoding on MLX (and PyTorch), packaged for exo.

Importing the package defines names and does nothing else: no I/O, no mlx, no torch.
The MLX API (``load``, ``generate``, ``stream_generate``,
``batch_generate``, ``BatchGenerator``) loads on first use, so
``exo_medusa_mlx.torch_compat`` works on machines without MLX.

On Linux, MLX's CPU build runs fast only with OpenBLAS loaded before ``mlx.core`` is
first imported. The rule: whatever imports ``mlx`` first calls ``setup_blas()`` before
it. ``load()`` and every ``mlx_medusa`` command do; code that imports ``mlx`` itself
calls ``exo_medusa_mlx.setup_blas()`` first (afterwards it only warns, once).
"""

__version__ = "0.1.0"
__all__ = ["load", "generate", "stream_generate", "batch_generate", "BatchGenerator", "GenerationResponse",
           "setup_blas", "__version__"]


def __getattr__(name: str):
    # Loaded on first use; the functions then replace the same-named submodules as
    # package attributes (as in mlx_lm, where ``generate`` is both).
    if name == "setup_blas":
        from ._blas import setup_blas

        return setup_blas
    if name in ("load", "generate", "stream_generate", "batch_generate", "BatchGenerator", "GenerationResponse"):
        from .core import batch_generation, generation
        from .loading import load

        globals().update(load=load, generate=generation.generate, stream_generate=generation.stream_generate,
                         GenerationResponse=generation.GenerationResponse,
                         batch_generate=batch_generation.batch_generate, BatchGenerator=batch_generation.BatchGenerator)
        return globals()[name]
    raise AttributeError(f"module 'exo_medusa_mlx' has no attribute '{name}'")
