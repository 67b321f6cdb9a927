"""A rotating-plus-tree KV cache in mlx-lm's cache protocol.

Committed tokens live in ``slots``: unbounded, or a window of ``max_kv_size - 1``
slots of which the first ``keep`` hold the sink tokens and the rest rotate.
Each forward writes its new tokens (a tree, a prompt chunk, or one token) to a
scratch region right after the used slots; ``commit`` gathers the accepted
nodes' K/V into their slots and drops the rest.

Exactness with a window: mlx-lm's ``RotatingKVCache(max_size=W, keep)`` lets the
query at position q see the sinks and positions ``(q - (W - keep), q]``. The mask
built here applies that rule to every query, so a tree node at depth d never sees
a committed token that sequential decoding would already have evicted, and the
window needs only ``W - 1`` slots (the query itself is in the scratch region).

One ``CacheContext`` is shared by all layers: it holds positions and builds the
mask once per forward. Layers receive it through ``make_mask`` and, for RoPE,
through ``offset`` (an int for contiguous tokens, a ``TreeOffset`` for a tree).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

DEFAULT_KEEP = 4  # mlx-lm's make_prompt_cache uses keep=4 with max_kv_size


class TreeOffset:
    """Per-token absolute positions of a tree forward, for ``TreeRoPE``."""

    __slots__ = ("positions",)

    def __init__(self, positions: mx.array):
        self.positions = positions  # (T,) int32


@dataclass(frozen=True)
class CommitPlan:
    src: np.ndarray  # scratch indices to copy
    dst: np.ndarray  # slots they go to
    base: int  # where the scratch region started
    identity: bool  # already in place: nothing to move


class CacheContext:
    """Positions, slot map and mask shared by every layer's cache."""

    def __init__(self, max_kv_size: int | None = None, keep: int = DEFAULT_KEEP):
        if max_kv_size is not None:
            if max_kv_size < keep + 2:
                raise ValueError(f"max_kv_size {max_kv_size} is too small: it must be at least keep + 2 = {keep + 2}")
        self.window = max_kv_size
        self.keep = keep if max_kv_size is not None else 0
        self.ring = None if max_kv_size is None else max_kv_size - 1 - keep
        self.committed = 0  # tokens committed so far = position of the next one
        self.slot_pos = np.zeros(0, dtype=np.int64)  # position held by each used slot
        self.mask = None
        self.rope_offset: int | TreeOffset = 0
        self._pending: np.ndarray | None = None  # positions of the forward in flight

    @property
    def used(self) -> int:
        return len(self.slot_pos)

    @property
    def capacity(self) -> int | None:
        """Committed slots at most (None: unbounded)."""
        return None if self.window is None else self.window - 1

    def begin(self, depths: np.ndarray | None = None, tree_mask: np.ndarray | None = None, n: int = 1) -> None:
        """Prepare the forward of a tree (depths, tree_mask) or of ``n`` contiguous tokens."""
        if depths is None:
            depths = np.arange(n)
            tree_mask = None
        depths = np.asarray(depths, dtype=np.int64)
        T = len(depths)
        q = self.committed + depths  # absolute positions of the new tokens
        self._pending = q
        chain = tree_mask is None
        self.rope_offset = self.committed if chain else TreeOffset(mx.array(q, dtype=mx.int32))
        if tree_mask is None:
            tree_mask = np.tri(T, dtype=bool)
        if self.window is None:
            if chain:
                self.mask = None if T == 1 else "causal"
                return
            seen_slots = np.ones((T, self.used), dtype=bool)
            seen_new = tree_mask
        else:
            span = self.window - self.keep  # positions (q - span, q] are in the window
            lo = (q - span)[:, None]
            sp = self.slot_pos[None, :]
            seen_slots = (sp < self.keep) | (sp > lo)
            seen_new = tree_mask & ((q[None, :] < self.keep) | (q[None, :] > lo))
            if chain and seen_slots.all() and np.array_equal(seen_new, np.tri(T, dtype=bool)):
                self.mask = None if T == 1 else "causal"
                return
        self.mask = mx.array(np.concatenate([seen_slots, seen_new], axis=1))

    def _slot(self, pos: np.ndarray) -> np.ndarray:
        if self.window is None:
            return pos
        return np.where(pos < self.keep, pos, self.keep + (pos - self.keep) % self.ring)

    def plan_commit(self, nodes: np.ndarray) -> tuple[CommitPlan, np.ndarray, int]:
        """Where the accepted nodes (indices into the forward, root first) go.

        Returns the plan, the absolute positions written, and the count committed.
        """
        nodes = np.asarray(nodes, dtype=np.int64)
        m = len(nodes)
        pos = self.committed + np.arange(m)
        dst = self._slot(pos)
        # With a window shorter than the commit, only the last write to a slot counts.
        _, last = np.unique(dst[::-1], return_index=True)
        keep_idx = np.sort(m - 1 - last)
        src, dst, pos = nodes[keep_idx], dst[keep_idx], pos[keep_idx]
        base = self.used
        identity = bool(np.array_equal(dst, base + src))
        return CommitPlan(src=src, dst=dst, base=base, identity=identity), pos, m

    def commit(self, caches, nodes) -> None:
        """Keep the accepted ``nodes`` of the last forward in every layer's cache."""
        plan, pos, m = self.plan_commit(nodes)
        for c in caches:
            c.apply(plan)
        end = max(self.used, int(plan.dst.max()) + 1) if len(plan.dst) else self.used
        slot_pos = np.full(end, -1, dtype=np.int64)
        slot_pos[: self.used] = self.slot_pos
        slot_pos[plan.dst] = pos
        self.slot_pos = slot_pos
        self.committed += m
        self._pending = None


class MedusaKVCache:
    """One layer's cache; see the module docstring."""

    step = 256

    def __init__(self, ctx: CacheContext):
        self.ctx = ctx
        self.keys = None
        self.values = None

    @property
    def offset(self):
        return self.ctx.rope_offset

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        base = self.ctx.used
        end = base + keys.shape[2]
        if self.keys is None or end > self.keys.shape[2]:
            B, H, _, Dk = keys.shape
            size = -(-end // self.step) * self.step
            cap = self.ctx.capacity
            if cap is not None:
                size = min(size, cap + keys.shape[2])
            new_k = mx.zeros((B, H, size, Dk), keys.dtype)
            new_v = mx.zeros((B, H, size, values.shape[3]), values.dtype)
            if self.keys is not None:
                new_k[..., :base, :] = self.keys[..., :base, :]
                new_v[..., :base, :] = self.values[..., :base, :]
            self.keys, self.values = new_k, new_v
        self.keys[..., base:end, :] = keys
        self.values[..., base:end, :] = values
        return self.keys[..., :end, :], self.values[..., :end, :]

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        if window_size is not None:
            raise ValueError("sliding-window attention layers are not supported by the Medusa cache")
        mask = self.ctx.mask
        if return_array and not isinstance(mask, mx.array):
            used = self.ctx.used
            mask = mx.array(np.concatenate([np.ones((N, used), bool), np.tri(N, dtype=bool)], axis=1))
        return mask

    def apply(self, plan: CommitPlan) -> None:
        if plan.identity or self.keys is None:
            return
        src = mx.array(plan.base + plan.src)
        dst = mx.array(plan.dst)
        self.keys[..., dst, :] = self.keys[..., src, :]
        self.values[..., dst, :] = self.values[..., src, :]

    @property
    def state(self):
        return self.keys, self.values

    def empty(self) -> bool:
        return self.keys is None

    def is_trimmable(self) -> bool:
        return False

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def make_cache(num_layers: int, max_kv_size: int | None = None, keep: int = DEFAULT_KEEP):
    """Per-layer caches sharing one context. Returns (context, caches)."""
    ctx = CacheContext(max_kv_size, keep)
    return ctx, [MedusaKVCache(ctx) for _ in range(num_layers)]
