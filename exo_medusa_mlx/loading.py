"""``load``: base model (mlx-lm's own classes), heads and tree, in one call."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from .core.heads_format import default_heads_for, default_tree_for
from .core.latency import fit_to_machine, tuned_facts
from .core.dynamic import checked_spec
from .core.tree import ROOT_ONLY
from .heads import load_heads
from .model import MedusaModel


def load(model: str | None = None, heads: str | Path | None = None, tree=None, dtype=None, lazy: bool = False):
    """Load a model for Medusa decoding.

    Args:
        model: local Hugging Face folder or repo id; None for the embedded default model.
        heads: Medusa heads folder or file; None for the heads shipped with the default
            model (if any). Without heads, decoding is plain.
        tree: preset name, JSON file, choices or ``dynamic[:N]``; None for the heads' tuned tree or
            the CPU default.
        dtype: weights' dtype; default float32 on CPU (bf16/fp16 skip BLAS there).
        lazy: leave the base model's weights unread until used (a pipeline rank keeps
            and reads only its own layers).

    Returns:
        (MedusaModel, tokenizer)
    """
    from mlx_lm.utils import load as mlx_load

    from .default_model import resolve_model_path

    heads_path = Path(heads) if heads is not None else default_heads_for(model)
    tuned = default_tree_for(heads_path)
    # Resolved first (even without heads), so a bad --tree fails before the model loads.
    buffers = checked_spec(tree if tree is not None else tuned)  # its size cap too, before the model loads
    path = resolve_model_path(model)
    base, tokenizer = mlx_load(str(path), lazy=lazy)
    if dtype is None and mx.default_device() == mx.cpu:
        dtype = mx.float32
    if dtype is not None:
        base.set_dtype(dtype)
    medusa_heads = None
    if heads_path is not None:
        medusa_heads = load_heads(heads_path, base.args.hidden_size, base.args.vocab_size,
                                  dtype=dtype or mx.float32)
    buffers = buffers if medusa_heads is not None else ROOT_ONLY
    facts = tuned_facts(tuned)
    medusa = MedusaModel(base, medusa_heads, buffers, model_id=str(model) if model else None, facts=facts)
    if tree is None:  # the product layout tuned with the tree, where it was tuned on this machine
        medusa = fit_to_machine(medusa, facts, str(heads_path), probe_here=False)
    return medusa, tokenizer
