"""``load`` on torch: base model (transformers' own classes), heads and tree, in one call."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.attach import attach, check_tree, weights_dtype
from ..core.heads_format import default_heads_for
from .generate import load_tokenizer
from .model import MedusaModel


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """torch's dtype for the weights (``dtype`` by name or a ``torch.dtype``; None for float32 on
    a CPU, bfloat16 on CUDA where supported, else float16; ``core.attach.weights_dtype``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    on_gpu = device.type == "cuda"
    gpu = "bfloat16" if on_gpu and torch.cuda.is_bf16_supported() else "float16"
    return getattr(torch, weights_dtype(dtype, not on_gpu, gpu))


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

    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype, device)
    heads = Path(heads) if heads is not None else default_heads_for(model)
    check_tree(heads, tree, MedusaModel.backend)  # even without heads: a bad --tree fails before the model loads
    path = resolve_model_path(model)
    base = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    base = base.to(device).eval()
    model_id = str(model) if model else None
    return attach(base, heads, tree, MedusaModel, model_id=model_id), load_tokenizer(path)
