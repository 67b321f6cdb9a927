"""``load``: base model (mlx-lm's own classes), heads and tree, in one call.

MLX is imported inside the functions, after ``setup_blas``, so that ``import exo_medusa_mlx``
then ``exo_medusa_mlx.load()`` gives MLX its OpenBLAS.
"""

from __future__ import annotations

from pathlib import Path

from ._blas import setup_blas
from .core.attach import attach, check_tree, weights_dtype
from .core.heads_format import default_heads_for


def resolve_dtype(dtype=None):
    """MLX's dtype for the weights (``dtype`` by name, an ``mx.Dtype``, or None for float32 on
    a CPU and the checkpoint's own on a GPU; ``core.attach.weights_dtype``)."""
    setup_blas()  # before the first import of mlx
    import mlx.core as mx

    if isinstance(dtype, mx.Dtype):
        return dtype
    name = weights_dtype(dtype, mx.default_device() == mx.cpu)
    return getattr(mx, name) if name is not None else None


def load(model: str | None = None, heads: str | Path | None = None, tree=None, dtype=None, lazy: bool = False):
    """Load a model for Medusa decoding.

    Args:
        model: local Hugging Face folder or repo id; None for the embedded default model.
        heads: Medusa heads folder or file; None for the heads shipped with the default
            model (if any). Without heads, decoding is plain.
        tree: preset name, JSON file, choices or ``dynamic[:N]``; None for the heads' tuned tree or
            the CPU default.
        dtype: weights' dtype (or its name); default float32 on CPU (bf16/fp16 skip BLAS there).
        lazy: leave the base model's weights unread until used (a pipeline rank keeps
            and reads only its own layers).

    Returns:
        (MedusaModel, tokenizer)
    """
    dtype = resolve_dtype(dtype)
    from mlx_lm.utils import load as mlx_load

    from .default_model import resolve_model_path
    from .model import MedusaModel

    heads = Path(heads) if heads is not None else default_heads_for(model)
    check_tree(heads, tree, MedusaModel.backend)  # even without heads: a bad --tree fails before the model loads
    base, tokenizer = mlx_load(str(resolve_model_path(model)), lazy=lazy)
    if dtype is not None:
        base.set_dtype(dtype)
    return attach(base, heads, tree, MedusaModel, model_id=str(model) if model else None), tokenizer
