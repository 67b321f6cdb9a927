"""Which backend runs a model, resolved once: ``auto`` is MLX where it is installed, else torch.

Every entry point that loads a model for decoding (``mlx_medusa generate``, the
server, the tools) goes through ``resolve_backend`` and ``load``; nothing here
imports MLX or torch until a backend is chosen.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ._blas import setup_blas

BACKENDS = ("mlx", "torch")


def resolve_backend(name: str = "auto") -> str:
    """"mlx" or "torch" for ``name`` ("auto", "mlx" or "torch")."""
    if name == "auto":
        return "mlx" if importlib.util.find_spec("mlx") is not None else "torch"
    if name not in BACKENDS:
        raise ValueError(f"backend '{name}' is not one of auto, {', '.join(BACKENDS)}")
    return name


def load(backend: str = "auto", model: str | None = None, heads: str | Path | None = None, tree=None,
         dtype: str | None = None, device: str | None = None):
    """(MedusaModel, tokenizer) on ``backend``; ``dtype`` by name (float32, float16, bfloat16).

    ``device`` is torch's (default CUDA when available); MLX uses its default device.
    """
    backend = resolve_backend(backend)
    if backend == "torch":
        from .torch_compat.loading import load as torch_load

        return torch_load(model, heads=heads, tree=tree, dtype=dtype, device=device)
    if device is not None:
        raise ValueError("--device is for --backend torch; MLX uses its default device")
    from .loading import load as mlx_load

    return mlx_load(model, heads=heads, tree=tree, dtype=dtype)


def thread_exit(backend: str):
    """What a thread that ran the backend's array work must call before it ends (MLX frees the
    thread's streams, or their cleanup can race interpreter shutdown), or None."""
    if resolve_backend(backend) == "mlx":
        setup_blas()  # before the first import of mlx
        import mlx.core as mx

        return mx.clear_streams
    return None
