"""The array primitives the neutral code (``core/base.py``) needs, on MLX."""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def topk_ids(logits: mx.array, k: int) -> mx.array:
    """Indices of the k largest logits, best first. logits: (..., V) -> (..., k)."""
    if k == 1:
        return mx.argmax(logits, axis=-1, keepdims=True)
    idx = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
    vals = mx.take_along_axis(logits, idx, axis=-1)
    return mx.take_along_axis(idx, mx.argsort(-vals, axis=-1), axis=-1)


def top_logprobs(logits: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """``topk_ids`` and the log-softmax of ``logits`` there: (..., V) -> (..., k), (..., k)."""
    idx = topk_ids(logits, k)
    z = logits.astype(mx.float32)
    return idx, mx.take_along_axis(z, idx, axis=-1) - mx.logsumexp(z, axis=-1, keepdims=True)


def to_numpy(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)  # numpy has no bfloat16


class MLXOps:
    topk = staticmethod(topk_ids)
    top_logprobs = staticmethod(top_logprobs)

    @staticmethod
    def stack(xs: list, axis: int = 0) -> mx.array:
        return mx.stack(xs, axis=axis)

    @staticmethod
    def concat(xs: list, axis: int = 0) -> mx.array:
        return mx.concatenate(xs, axis=axis)

    @staticmethod
    def take(a: mx.array, idx: np.ndarray) -> mx.array:
        return mx.take(a, mx.array(np.asarray(idx), dtype=mx.int32), axis=-1)

    @staticmethod
    def argmax(a: mx.array) -> mx.array:
        return mx.argmax(a, axis=-1)

    @staticmethod
    def scatter_vocab(sub: mx.array, ids: mx.array, vocab_size: int) -> mx.array:
        rows = mx.full(sub.shape[:-1] + (vocab_size,), -mx.inf, dtype=sub.dtype)
        return mx.put_along_axis(rows, mx.broadcast_to(ids, sub.shape), sub, axis=-1)

    @staticmethod
    def numpy(*arrays) -> tuple:
        mx.eval([a for a in arrays if a is not None])
        return tuple(None if a is None else to_numpy(a) for a in arrays)
