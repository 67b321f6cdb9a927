"""What heads are scored by in training and tuning: the per-head loss and the ranks of the base model's
own next tokens, given what each head reads beside the hidden state (``path_embeds``)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from .hidden_files import iterate_batches
from ..heads import MedusaHeads


HEAD_DECAY = 0.8  # head i's loss weight is HEAD_DECAY ** i


def head_logits(heads: MedusaHeads, lm_head, h: mx.array, embeds: list | None = None, draft=None) -> mx.array:
    """(K, B, V) logits of every head at hidden states h: (B, H); ``embeds``: ``path_embeds``;
    ``draft``: (ids, rows), see ``MedusaHeads.project``."""
    return heads.project(h, lm_head, base=False, draft=draft, path_embeds=embeds)


def path_embeds(heads: MedusaHeads, embed, batch: dict) -> list | None:
    """What the heads read beside the hidden state, as in decoding on an accepted path (teacher
    forcing): the embedding of the token fed after each row (next-token heads: the root),
    and for hydra heads those of the tokens after it (the rows' targets; head d reads d+1)."""
    if not (heads.config.next_token or heads.config.hydra):
        return None
    if embed is None:
        raise ValueError("next-token and hydra heads need the base model's embedding (embed=)")
    out = [embed(mx.array(batch["next"]))]
    if heads.config.hydra:
        t = np.maximum(batch["targets"], 0)  # -1 past a sequence's end: those rows' later heads are masked
        out += [embed(mx.array(t[:, j])) for j in range(heads.num_heads - 1)]
    return out


def loss_fn(heads: MedusaHeads, lm_head, h, targets, teacher_ids=None, teacher_probs=None, embeds=None):
    """Weighted CE (or top-k KL to the base model) summed over heads; also per-head loss and top-1.

    targets: (B, K) with -1 where the sequence ends; teacher_*: (B, K, k); embeds:
    ``path_embeds`` (next-token and hydra heads).
    """
    logits = head_logits(heads, lm_head, h, embeds).astype(mx.float32)  # (K, B, V)
    t = targets.T  # (K, B)
    valid = (t >= 0).astype(mx.float32)
    lse = mx.logsumexp(logits, axis=-1)
    if teacher_ids is None:
        picked = mx.take_along_axis(logits, mx.maximum(t, 0)[..., None], axis=-1)[..., 0]
    else:
        tid, tp = teacher_ids.transpose(1, 0, 2), teacher_probs.transpose(1, 0, 2)  # (K, B, k)
        tp = tp / tp.sum(-1, keepdims=True)
        picked = (mx.take_along_axis(logits, tid, axis=-1) * tp).sum(-1)
    per_head = ((lse - picked) * valid).sum(-1) / mx.maximum(valid.sum(-1), 1.0)  # (K,)
    weights = HEAD_DECAY ** mx.arange(per_head.shape[0], dtype=mx.float32)
    top1 = ((mx.argmax(logits, axis=-1) == t) * valid).sum(-1) / mx.maximum(valid.sum(-1), 1.0)
    return (weights * per_head).sum(), (per_head, top1)


def target_ranks(heads: MedusaHeads, lm_head, h: mx.array, targets: mx.array, embeds: list | None = None,
                 draft=None) -> mx.array:
    """Rank of each target among its head's logits (0 = top-1; -1 where no target). (B, K)."""
    return _ranks(head_logits(heads, lm_head, h, embeds, draft).astype(mx.float32), targets)


def ranks_and_logprobs(heads: MedusaHeads, lm_head, h: mx.array, targets: mx.array, embeds: list | None = None,
                       draft=None, k: int = 10) -> tuple[mx.array, mx.array]:
    """``target_ranks`` (B, K), and each head's log-probabilities of its top-``k`` guesses (B, K, k):
    what a dynamic tree's calibration is fitted on (``core.dynamic.fit_calibration``)."""
    from ..array_ops import top_logprobs

    logits = head_logits(heads, lm_head, h, embeds, draft).astype(mx.float32)  # (K, B, V)
    return _ranks(logits, targets), top_logprobs(logits, k)[1].transpose(1, 0, 2)


def _ranks(logits: mx.array, targets: mx.array) -> mx.array:
    t = targets.T
    tl = mx.take_along_axis(logits, mx.maximum(t, 0)[..., None], axis=-1)
    rank = mx.where(tl[..., 0] > -mx.inf, (logits > tl).sum(-1), logits.shape[-1])  # outside a draft: never
    return mx.where(t >= 0, rank, -1).T


def evaluate(heads, lm_head, folder: Path, files: list[str], batch_size: int, topk=(1, 5), embed=None,
             draft=None) -> dict:
    """Per-head top-k accuracies on a split."""
    hits = np.zeros((heads.num_heads, max(topk)))
    counts = np.zeros(heads.num_heads)
    for b in iterate_batches(folder, files, heads.num_heads, batch_size):
        r = target_ranks(heads, lm_head, mx.array(b["hidden"], dtype=mx.float32), mx.array(b["targets"]),
                         path_embeds(heads, embed, b), draft)
        r = np.array(r)
        for k in range(max(topk)):
            hits[:, k] += ((r >= 0) & (r <= k)).sum(0)
        counts += (r >= 0).sum(0)
    acc = hits / np.maximum(counts, 1)[:, None]
    return {f"top{k}": [round(float(a), 4) for a in acc[:, k - 1]] for k in topk} | {"rows": int(counts[0])}
