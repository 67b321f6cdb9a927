"""``load``: base model (mlx-lm's own classes), heads and tree, in one call.

MLX is imported inside ``load``, after ``setup_blas``, so that ``import exo_medusa_mlx``
then ``exo_medusa_mlx.load()`` gives MLX its OpenBLAS.
"""

from __future__ import annotations

from pathlib import Path

from ._blas import setup_blas
from .core.heads_format import default_heads_for, default_tree_for
from .core.latency import fit_to_machine, tuned_facts
from .core.tree import ROOT_ONLY, load_tree, tree_choices


def load(model: str | None = None, heads: str | Path | None = None, tree=None, dtype=None, lazy: bool = False):
    """Load a model for Medusa decoding.

    Args:
        model: local Hugging Face folder or repo id; None for the embedded default model.
        heads: Medusa heads folder or file; None for the heads shipped with the default
            model (if any). Without heads, decoding is plain.
        tree: preset name, JSON file or choices; None for the heads' tuned tree or
            the CPU default.
        dtype: weights' dtype (or its name); default float32 on CPU (bf16/fp16 skip BLAS there).
        lazy: leave the base model's weights unread until used (a pipeline rank keeps
            and reads only its own layers).

    Returns:
        (MedusaModel, tokenizer)
    """
    setup_blas()  # before the first import of mlx
    import mlx.core as mx
    from mlx_lm.utils import load as mlx_load

    from .default_model import resolve_model_path
    from .heads import load_heads
    from .model import MedusaModel

    heads_path = Path(heads) if heads is not None else default_heads_for(model)
    tuned = default_tree_for(heads_path)
    # Resolved first (even without heads), so a bad --tree fails before the model loads.
    choices = tree_choices(tree if tree is not None else tuned)
    buffers = load_tree(choices)  # its size cap too, before the model loads
    path = resolve_model_path(model)
    base, tokenizer = mlx_load(str(path), lazy=lazy)
    if isinstance(dtype, str):
        dtype = getattr(mx, dtype)
    if dtype is None and mx.default_device() == mx.cpu:
        dtype = mx.float32
    if dtype is not None:
        base.set_dtype(dtype)
    medusa_heads = None
    if heads_path is not None:
        medusa_heads = load_heads(heads_path, base.args.hidden_size, base.args.vocab_size,
                                  dtype=dtype or mx.float32)
    buffers = buffers if medusa_heads is not None else ROOT_ONLY
    medusa = MedusaModel(base, medusa_heads, buffers, model_id=str(model) if model else None)
    if tree is None:  # the product layout tuned with the tree, where it was tuned on this machine
        medusa = fit_to_machine(medusa, tuned_facts(tuned), str(heads_path), probe_here=False)
    return medusa, tokenizer
