"""Medusa heads as torch modules (the twin of ``exo_medusa_mlx.heads``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..heads_format import DRAFT_KEY, MedusaConfig, read_heads, resolve_config, write_heads


class ResBlock(nn.Module):
    """``x + SiLU(W x + b)``; W starts at zero (as the reference), so a fresh block
    only adds the constant SiLU(b): training starts from the base model's features."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHead(nn.Module):
    def __init__(self, cfg: MedusaConfig):
        super().__init__()
        if cfg.next_token:
            # Starts at zero: a fresh (or converted) head begins as a plain Medusa head.
            self.next_token = nn.Linear(cfg.hidden_size, cfg.hidden_size)
            nn.init.zeros_(self.next_token.weight)
            nn.init.zeros_(self.next_token.bias)
        # Distinct blocks (the reference's ``[ResBlock(h)] * n`` shares one).
        self.blocks = nn.ModuleList([ResBlock(cfg.hidden_size) for _ in range(cfg.num_layers)])
        if cfg.own_lm_head:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor, next_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if next_embeds is not None:
            x = x + self.next_token(next_embeds)
        for b in self.blocks:
            x = b(x)
        return x


class MedusaHeads(nn.Module):
    """K heads over the base model's last (normed) hidden state.

    Head i guesses the token at t+2+i; the base lm_head gives t+1.
    """

    def __init__(self, cfg: MedusaConfig):
        super().__init__()
        self.config = cfg
        self.heads = nn.ModuleList([MedusaHead(cfg) for _ in range(cfg.num_heads)])
        self.draft_vocab: np.ndarray | None = None  # token ids the guesses are scored over (None: all)

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def states(self, h: torch.Tensor, num: int | None = None,
               next_embeds: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The first ``num`` heads' hidden states at ``h`` (before any lm_head), each (..., H)."""
        if self.config.next_token and next_embeds is None:
            raise ValueError("these heads read the base model's next token: pass next_embeds")
        return [head(h, next_embeds if self.config.next_token else None) for head in list(self.heads)[:num]]

    def project(self, h: torch.Tensor, lm_head: nn.Module, base: bool = True, num: int | None = None,
                next_embeds: torch.Tensor | None = None,
                draft: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits of the base head and every Medusa head at ``h``.

        h: (..., H). Returns (1+K, ..., V): row 0 the base model's, row 1+i head i's
        (without ``base``: (K, ..., V), the heads' alone). ``num``: only the first
        ``num`` heads (a tree ``num`` deep reads no others). With the shared layout,
        all hidden states go through ``lm_head`` in one matmul. ``next_embeds``
        (..., H): embeddings of the base model's next token at ``h``, which
        next-token heads need (``MedusaModel.project`` passes them). ``draft``:
        (ids, lm_head rows of those ids), to score the guesses over the draft
        vocabulary alone (the other logits are -inf); a second, smaller pass.
        """
        heads = list(self.heads)[:num]
        hs = self.states(h, num, next_embeds)
        if draft is not None:
            ids, w = draft
            sub = torch.stack(hs) @ w.T  # (K, ..., V')
            rows = sub.new_full(sub.shape[:-1] + (self.config.vocab_size,), float("-inf"))
            rows = rows.index_copy(-1, ids, sub)
        elif not self.config.own_lm_head:
            return lm_head(torch.stack([h] + hs if base else hs))  # (1+K, ..., H) @ (H, V)
        else:
            rows = torch.stack([head.lm_head(x) for head, x in zip(heads, hs)])
        return torch.cat([lm_head(h)[None], rows]) if base else rows

    # --- checkpoints -----------------------------------------------------

    def reference_weights(self) -> dict[str, np.ndarray]:
        """Weights under the reference key layout (float32 numpy)."""
        out = {}
        n = self.config.num_layers

        def arr(p: torch.Tensor) -> np.ndarray:
            return p.detach().to("cpu", torch.float32).numpy()

        for i, head in enumerate(self.heads):
            if self.config.next_token:
                out[f"{i}.next_token.weight"] = arr(head.next_token.weight)
                out[f"{i}.next_token.bias"] = arr(head.next_token.bias)
            for j, b in enumerate(head.blocks):
                out[f"{i}.{j}.linear.weight"] = arr(b.linear.weight)
                out[f"{i}.{j}.linear.bias"] = arr(b.linear.bias)
            if self.config.own_lm_head:
                out[f"{i}.{n}.weight"] = arr(head.lm_head.weight)
        if self.draft_vocab is not None:
            out[DRAFT_KEY] = self.draft_vocab
        return out

    @torch.no_grad()
    def load_reference_weights(self, weights: dict[str, np.ndarray]) -> None:
        n = self.config.num_layers
        for i, head in enumerate(self.heads):
            if self.config.next_token:
                head.next_token.weight.copy_(torch.from_numpy(weights[f"{i}.next_token.weight"]))
                head.next_token.bias.copy_(torch.from_numpy(weights[f"{i}.next_token.bias"]))
            for j, b in enumerate(head.blocks):
                b.linear.weight.copy_(torch.from_numpy(weights[f"{i}.{j}.linear.weight"]))
                b.linear.bias.copy_(torch.from_numpy(weights[f"{i}.{j}.linear.bias"]))
            if self.config.own_lm_head:
                head.lm_head.weight.copy_(torch.from_numpy(weights[f"{i}.{n}.weight"]))
        self.draft_vocab = np.asarray(weights[DRAFT_KEY]) if DRAFT_KEY in weights else None

    def save(self, folder: str | Path) -> Path:
        return write_heads(folder, self.reference_weights(), self.config)


def load_heads(path: str | Path, hidden_size: int, vocab_size: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> MedusaHeads:
    """Load heads from a folder or a ``medusa_lm_head.{safetensors,pt}`` file.

    The head count and layout come from the keys; shapes are checked against the
    base model's hidden size and vocabulary.
    """
    weights, raw, file = read_heads(path)
    cfg = resolve_config(weights, raw, str(file), hidden_size, vocab_size)
    heads = MedusaHeads(cfg)
    heads.load_reference_weights(weights)
    return heads.to(device=device, dtype=dtype).eval()
