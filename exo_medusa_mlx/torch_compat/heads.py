"""Medusa heads as torch modules (their logic is ``core.base.HeadsBase``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.base import HeadsBase, head_state
from ..core.heads_format import MedusaConfig
from .array_ops import TorchOps


class ResBlock(nn.Module):
    """``x + SiLU(W x + b)``; W starts at zero (as the reference), so a fresh block
    only adds the constant SiLU(b): training starts from the base model's features."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


def _zero_linear(size: int) -> nn.Linear:
    """A map that starts at zero: a fresh (or converted) head begins as a plain Medusa head."""
    lin = nn.Linear(size, size)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


class MedusaHead(nn.Module):
    """Head ``index`` (as the MLX one): blocks, plus maps of the root's or the path's token embeddings."""

    def __init__(self, cfg: MedusaConfig, index: int = 0):
        super().__init__()
        if cfg.next_token:
            self.next_token = _zero_linear(cfg.hidden_size)
        self.path = nn.ModuleList([_zero_linear(cfg.hidden_size) for _ in range(index + 1)] if cfg.hydra else [])
        # Distinct blocks (the reference's ``[ResBlock(h)] * n`` shares one).
        self.blocks = nn.ModuleList([ResBlock(cfg.hidden_size) for _ in range(cfg.num_layers)])
        if cfg.own_lm_head:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor, embeds: list | None = None) -> torch.Tensor:
        """x: (..., H); ``embeds``: the path's token embeddings, root first, each (..., H)."""
        return head_state(x, getattr(self, "next_token", None), self.path, self.blocks, embeds)


class MedusaHeads(HeadsBase, nn.Module):
    """K heads over the base model's last (normed) hidden state (see ``HeadsBase``)."""

    ops = TorchOps

    def __init__(self, cfg: MedusaConfig):
        nn.Module.__init__(self)
        self.config = cfg
        self.heads = nn.ModuleList([MedusaHead(cfg, i) for i in range(cfg.num_heads)])
        self.draft_vocab: np.ndarray | None = None

    def named_arrays(self) -> dict[str, np.ndarray]:
        return {k: v.detach().to("cpu", torch.float32).numpy() for k, v in self.state_dict().items()}

    @torch.no_grad()
    def assign(self, arrays: dict[str, np.ndarray]) -> None:
        self.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}, strict=True)


def load_heads(path: str | Path, hidden_size: int, vocab_size: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> MedusaHeads:
    """Heads from a folder or a ``medusa_lm_head.{safetensors,pt}`` file (``HeadsBase.read``), in
    ``dtype`` on ``device``."""
    return MedusaHeads.read(path, hidden_size, vocab_size).to(device=device, dtype=dtype).eval()
