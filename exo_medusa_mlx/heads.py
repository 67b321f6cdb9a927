"""Medusa heads as MLX modules (their logic is ``core.base.HeadsBase``)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .array_ops import MLXOps, to_numpy
from .core.base import HeadsBase, head_state
from .core.heads_format import MedusaConfig


class ResBlock(nn.Module):
    """``x + SiLU(W x + b)``; W starts at zero (as in the reference), so a fresh block adds SiLU(b)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        self.linear.weight = mx.zeros_like(self.linear.weight)

    def __call__(self, x: mx.array) -> mx.array:
        return x + nn.silu(self.linear(x))


def _zero_linear(size: int) -> nn.Linear:
    """A map that starts at zero: a fresh (or converted) head begins as a plain Medusa head."""
    lin = nn.Linear(size, size)
    lin.weight, lin.bias = mx.zeros_like(lin.weight), mx.zeros_like(lin.bias)
    return lin


class MedusaHead(nn.Module):
    """Head ``index``: blocks over the hidden state plus, by layout, maps of the root's embedding
    (``next_token``) or of its path's tokens' (``path``, hydra: the root and ``index`` more)."""

    def __init__(self, cfg: MedusaConfig, index: int = 0):
        super().__init__()
        if cfg.next_token:
            self.next_token = _zero_linear(cfg.hidden_size)
        if cfg.hydra:
            self.path = [_zero_linear(cfg.hidden_size) for _ in range(index + 1)]
        # Distinct blocks (the reference's ``[ResBlock(h)] * n`` shares one).
        self.blocks = [ResBlock(cfg.hidden_size) for _ in range(cfg.num_layers)]
        if cfg.own_lm_head:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def __call__(self, x: mx.array, embeds: list | None = None) -> mx.array:
        """x: (..., H); ``embeds``: the path's token embeddings, root first, each (..., H)."""
        return head_state(x, self.get("next_token"), self.get("path", []), self.blocks, embeds)


class MedusaHeads(HeadsBase, nn.Module):
    """K heads over the base model's last (normed) hidden state (see ``HeadsBase``)."""

    ops = MLXOps

    def __init__(self, cfg: MedusaConfig):
        nn.Module.__init__(self)
        self.config = cfg
        self.heads = [MedusaHead(cfg, i) for i in range(cfg.num_heads)]
        self.draft_vocab: np.ndarray | None = None

    def named_arrays(self) -> dict[str, np.ndarray]:
        mx.eval(self.parameters())
        return {k: to_numpy(v.astype(mx.float32)) for k, v in tree_flatten(self.parameters())}

    def assign(self, arrays: dict[str, np.ndarray]) -> None:
        self.load_weights([(k, mx.array(v)) for k, v in arrays.items()], strict=True)


def load_heads(path: str | Path, hidden_size: int, vocab_size: int, dtype=mx.float32) -> MedusaHeads:
    """Heads from a folder or a ``medusa_lm_head.{safetensors,pt}`` file (``HeadsBase.read``), in ``dtype``."""
    heads = MedusaHeads.read(path, hidden_size, vocab_size)
    heads.set_dtype(dtype)
    mx.eval(heads.parameters())
    return heads
