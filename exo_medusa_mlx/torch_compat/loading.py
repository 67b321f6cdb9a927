"""``load`` on torch: base model (transformers' own classes), heads and tree, in one call."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.heads_format import default_heads_for, default_tree_for
from ..core.latency import fit_to_machine, tuned_facts
from ..core.dynamic import checked_spec
from ..core.tree import ROOT_ONLY
from .generate import load_tokenizer
from .heads import load_heads
from .model import MedusaModel


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU (exact, and fast BLAS); bfloat16 on CUDA where supported."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"dtype '{dtype}' is not supported: use one of {', '.join(names)}")
    return names[dtype]


def load(model: str | None = None, heads: str | Path | None = None, tree=None,
         dtype: str | torch.dtype | None = None, device: str | torch.device | None = None):
    """Load a model for Medusa decoding on torch.

    Args:
        model: local Hugging Face folder or repo id; None for the embedded default model.
        heads: Medusa heads folder or file; None for the heads shipped with the default
            model (if any). Without heads, decoding is plain.
        tree: preset name, JSON file, choices or ``dynamic[:N]``; None for the heads' tuned tree (``tree.torch.json``,
            else ``tree.json``) when it was tuned on this machine, else the tree a few-second probe
            of this machine picks from the heads' recorded accuracies (``core.latency.fit_to_machine``).
        dtype: weights' dtype (or its name); default float32 on CPU, bfloat16 on CUDA.
        device: default CUDA when available, else CPU.

    Returns:
        (MedusaModel, tokenizer): transformers' tokenizer with mlx-lm's ``eos_token_ids`` and
        ``detokenizer`` (``TokenizerWrapper``).
    """
    from transformers import AutoModelForCausalLM

    from ..default_model import resolve_model_path

    heads_path = Path(heads) if heads is not None else default_heads_for(model)
    tuned = default_tree_for(heads_path, "torch")
    # Resolved first (even without heads), so a bad --tree fails before the model loads.
    buffers = checked_spec(tree if tree is not None else tuned)  # its size cap too, before the model loads
    path = resolve_model_path(model)
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype) or default_dtype(device)
    base = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    base = base.to(device).eval()
    tokenizer = load_tokenizer(path)
    medusa_heads = None
    if heads_path is not None:
        medusa_heads = load_heads(heads_path, base.config.hidden_size, base.config.vocab_size,
                                  dtype=dtype, device=device)
    buffers = buffers if medusa_heads is not None else ROOT_ONLY
    facts = tuned_facts(tuned)
    medusa = MedusaModel(base, medusa_heads, buffers, model_id=str(model) if model else None, facts=facts)
    if tree is None:  # the tree tuned with the heads, if tuned here; else a probe of this machine picks one
        medusa = fit_to_machine(medusa, facts, str(heads_path))
    return medusa, tokenizer
