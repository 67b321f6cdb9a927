"""Medusa heads as MLX modules."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .heads_format import DRAFT_KEY, MedusaConfig, read_heads, resolve_config, write_heads


class ResBlock(nn.Module):
    """``x + SiLU(W x + b)``; W starts at zero (as in the reference), so a fresh block adds SiLU(b)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        self.linear.weight = mx.zeros_like(self.linear.weight)

    def __call__(self, x: mx.array) -> mx.array:
        return x + nn.silu(self.linear(x))


class MedusaHead(nn.Module):
    def __init__(self, cfg: MedusaConfig):
        super().__init__()
        if cfg.next_token:
            # Starts at zero: a fresh (or converted) head begins as a plain Medusa head.
            self.next_token = nn.Linear(cfg.hidden_size, cfg.hidden_size)
            self.next_token.weight = mx.zeros_like(self.next_token.weight)
            self.next_token.bias = mx.zeros_like(self.next_token.bias)
        # Distinct blocks (the reference's ``[ResBlock(h)] * n`` shares one).
        self.blocks = [ResBlock(cfg.hidden_size) for _ in range(cfg.num_layers)]
        if cfg.own_lm_head:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def __call__(self, x: mx.array, next_embeds: mx.array | None = None) -> mx.array:
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
        self.heads = [MedusaHead(cfg) for _ in range(cfg.num_heads)]
        self.draft_vocab: np.ndarray | None = None  # token ids the guesses are scored over (None: all)

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def states(self, h: mx.array, num: int | None = None, next_embeds: mx.array | None = None) -> list[mx.array]:
        """The first ``num`` heads' hidden states at ``h`` (before any lm_head), each (..., H)."""
        if self.config.next_token and next_embeds is None:
            raise ValueError("these heads read the base model's next token: pass next_embeds")
        return [head(h, next_embeds if self.config.next_token else None) for head in list(self.heads)[:num]]

    def project(self, h: mx.array, lm_head, base: bool = True, num: int | None = None,
                next_embeds: mx.array | None = None, draft: tuple[mx.array, mx.array] | None = None) -> mx.array:
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
            sub = mx.stack(hs) @ w.T  # (K, ..., V')
            rows = mx.full(sub.shape[:-1] + (self.config.vocab_size,), -mx.inf, dtype=sub.dtype)
            rows = mx.put_along_axis(rows, mx.broadcast_to(ids, sub.shape), sub, axis=-1)
        elif not self.config.own_lm_head:
            return lm_head(mx.stack([h] + hs if base else hs))
        else:
            rows = mx.stack([head.lm_head(x) for head, x in zip(heads, hs)])
        return mx.concatenate([lm_head(h)[None], rows]) if base else rows

    # --- checkpoints -----------------------------------------------------

    def reference_weights(self) -> dict[str, np.ndarray]:
        """Weights under the reference key layout."""
        out = {}
        n = self.config.num_layers
        for i, head in enumerate(self.heads):
            if self.config.next_token:
                out[f"{i}.next_token.weight"] = np.array(head.next_token.weight)
                out[f"{i}.next_token.bias"] = np.array(head.next_token.bias)
            for j, b in enumerate(head.blocks):
                out[f"{i}.{j}.linear.weight"] = np.array(b.linear.weight)
                out[f"{i}.{j}.linear.bias"] = np.array(b.linear.bias)
            if self.config.own_lm_head:
                out[f"{i}.{n}.weight"] = np.array(head.lm_head.weight)
        if self.draft_vocab is not None:
            out[DRAFT_KEY] = self.draft_vocab
        return out

    def load_reference_weights(self, weights: dict[str, np.ndarray]) -> None:
        n = self.config.num_layers
        for i, head in enumerate(self.heads):
            if self.config.next_token:
                head.next_token.weight = mx.array(weights[f"{i}.next_token.weight"])
                head.next_token.bias = mx.array(weights[f"{i}.next_token.bias"])
            for j, b in enumerate(head.blocks):
                b.linear.weight = mx.array(weights[f"{i}.{j}.linear.weight"])
                b.linear.bias = mx.array(weights[f"{i}.{j}.linear.bias"])
            if self.config.own_lm_head:
                head.lm_head.weight = mx.array(weights[f"{i}.{n}.weight"])
        self.draft_vocab = np.asarray(weights[DRAFT_KEY]) if DRAFT_KEY in weights else None

    def save(self, folder: str | Path) -> Path:
        mx.eval(self.parameters())
        return write_heads(folder, self.reference_weights(), self.config)


def load_heads(path: str | Path, hidden_size: int, vocab_size: int, dtype=mx.float32) -> MedusaHeads:
    """Load heads from a folder or a ``medusa_lm_head.{safetensors,pt}`` file.

    The head count and layout come from the keys; shapes are checked against the
    base model's hidden size and vocabulary.
    """
    weights, raw, file = read_heads(path)
    cfg = resolve_config(weights, raw, str(file), hidden_size, vocab_size)
    heads = MedusaHeads(cfg)
    heads.load_reference_weights(weights)
    heads.set_dtype(dtype)
    mx.eval(heads.parameters())
    return heads
