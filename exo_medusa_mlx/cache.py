"""A rotating-plus-tree KV cache in mlx-lm's cache protocol.

The slot bookkeeping and masks are in ``core/slots.py`` (shared with torch). One
``CacheContext`` is shared by all layers: layers receive the mask through
``make_mask`` and the RoPE positions through ``offset`` (an int for contiguous
tokens, a ``TreeOffset`` for a tree); ``commit`` gathers the accepted nodes' K/V
into their slots in every layer. ``BatchContext`` drives the same layers for B
sequences at once (``core/batch_slots.py``): keys (B, heads, S, D), a mask per row,
per-row RoPE offsets or positions, per-row commits.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .core.batch_slots import BatchSlots
from .core.slots import DEFAULT_KEEP, CommitPlan, SlotMap

__all__ = ["DEFAULT_KEEP", "BatchContext", "CacheContext", "MedusaKVCache", "TreeOffset", "make_batch_cache",
           "make_cache"]


class TreeOffset:
    """Per-token absolute positions of a tree forward, for ``TreeRoPE``."""

    __slots__ = ("positions",)

    def __init__(self, positions: mx.array):
        self.positions = positions  # (T,) int32, or (B, T) one row per sequence of a batch


class CacheContext(SlotMap):
    """The slot map plus the MLX mask and RoPE offset of the forward in flight."""

    def __init__(self, max_kv_size: int | None = None, keep: int = DEFAULT_KEEP):
        super().__init__(max_kv_size, keep)
        self.mask = None
        self.rope_offset: int | TreeOffset = 0

    def begin(self, depths: np.ndarray | None = None, tree_mask: np.ndarray | None = None, n: int = 1) -> None:
        """Prepare the forward of a tree (depths, tree_mask) or of ``n`` contiguous tokens."""
        plan = self.plan_forward(depths, tree_mask, n)
        self.rope_offset = self.committed if plan.contiguous else TreeOffset(mx.array(plan.positions, dtype=mx.int32))
        self.mask = mx.array(plan.mask) if isinstance(plan.mask, np.ndarray) else plan.mask

    def commit(self, caches, nodes) -> None:
        """Keep the accepted ``nodes`` of the last forward in every layer's cache."""
        plan = self.plan_commit(nodes)
        for c in caches:
            c.apply(plan)
        self.apply_commit(plan)

    # Lookahead decoding (``lookahead.Lookahead``) queues a forward before the
    # host knows what the last one accepted, so it keeps every forward's tokens in
    # place and hides the rejected ones with a mask computed on the device.

    def begin_on_device(self, mask: mx.array, offset: mx.array | TreeOffset) -> None:
        """Prepare a forward whose mask (T, used+T) and RoPE offset are device arrays."""
        self.mask, self.rope_offset = mask, offset

    def keep_in_place(self, n: int) -> None:
        """Keep the last forward's ``n`` tokens where they were written (their
        positions are known only on the device; -1 here)."""
        self.slot_pos = np.concatenate([self.slot_pos, np.full(n, -1, dtype=np.int64)])

    def compact(self, caches, slots: np.ndarray) -> None:
        """Keep only ``slots`` (ascending), moved to the front, in every layer's cache."""
        slots = np.asarray(slots, dtype=np.int64)
        dst = np.arange(len(slots))
        plan = CommitPlan(slots, dst, 0, bool(np.array_equal(slots, dst)), self.slot_pos[slots], 0)
        for c in caches:
            c.apply(plan)
        self.slot_pos = self.slot_pos[slots]


class BatchContext(BatchSlots):
    """The rows of a batch plus the MLX mask and RoPE offset of the forward in flight.

    One row runs exactly the single-sequence arrays: a (T, S) mask and an int offset."""

    def __init__(self):
        super().__init__()
        self.mask = None
        self.rope_offset: int | mx.array | TreeOffset = 0

    def begin(self, trees: list) -> None:
        """Prepare the forward of each row's tree (``TreeBuffers``), padded to the largest."""
        plan = self.plan_forward([(t.depths, t.mask) for t in trees])
        one = len(trees) == 1
        if plan.offsets is not None:
            self.rope_offset = int(plan.offsets[0]) if one else mx.array(plan.offsets, dtype=mx.int32)
        else:
            self.rope_offset = TreeOffset(mx.array(plan.positions[0] if one else plan.positions, dtype=mx.int32))
        mask = plan.mask
        self.mask = mx.array(mask[0] if one else mask[:, None]) if isinstance(mask, np.ndarray) else mask

    def commit(self, caches, nodes: list) -> None:
        """Keep each row's accepted ``nodes`` of the last forward in every layer's cache."""
        plan = self.plan_commit(nodes)
        if len(self.rows) == 1:
            for c in caches:
                c.apply(plan.plans[0])
        elif plan.src is not None:
            src, dst = mx.array(plan.src, dtype=mx.int32), mx.array(plan.dst, dtype=mx.int32)
            for c in caches:
                c.apply_rows(src, dst)
        self.apply_commit(plan)

    def join(self, caches, row: SlotMap, row_caches) -> None:
        """Add a sequence (its slot map and single-sequence caches, after its prefill) as the last row."""
        for c, r in zip(caches, row_caches):
            c.add_rows(r)
        self.add_row(row)

    def leave(self, caches, keep: list[int]) -> None:
        """Keep only the rows ``keep`` (in that order)."""
        for c in caches:
            c.select_rows(keep)
        self.keep_rows(keep)


class MedusaKVCache:
    """One layer's cache: used slots, then the scratch region of the current forward."""

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
            mask = mx.array(np.concatenate([np.ones((N, self.ctx.used), bool), np.tri(N, dtype=bool)], axis=1))
        return mask

    def apply(self, plan: CommitPlan) -> None:
        if plan.identity or self.keys is None:
            return
        src = mx.array(plan.base + plan.src)
        dst = mx.array(plan.dst)
        self.keys[..., dst, :] = self.keys[..., src, :]
        self.values[..., dst, :] = self.values[..., src, :]

    def apply_rows(self, src: mx.array, dst: mx.array) -> None:
        """Copy columns ``src`` to ``dst``, each (B, n), row by row (all read before any is written)."""
        if self.keys is None:
            return
        self.keys, self.values = (_move_columns(a, src, dst) for a in (self.keys, self.values))

    def add_rows(self, other: "MedusaKVCache") -> None:
        """Append ``other``'s rows; the shorter buffer is padded with zeros (finite: holes are masked)."""
        if self.keys is None:
            self.keys, self.values = other.keys, other.values
            return
        size = max(self.keys.shape[2], other.keys.shape[2])
        self.keys, self.values = (mx.concatenate([_pad_columns(a, size), _pad_columns(b, size)])
                                  for a, b in ((self.keys, other.keys), (self.values, other.values)))

    def select_rows(self, keep: list[int]) -> None:
        """Keep the rows ``keep`` (the batch's sequences that stay), in that order; none: empty."""
        if self.keys is not None:
            idx = mx.array(keep, dtype=mx.int32) if keep else None
            self.keys, self.values = (None, None) if idx is None else (self.keys[idx], self.values[idx])

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


def _move_columns(a: mx.array, src: mx.array, dst: mx.array) -> mx.array:
    B, H, _, D = a.shape
    n = src.shape[1]
    moved = mx.take_along_axis(a, mx.broadcast_to(src[:, None, :, None], (B, H, n, D)), axis=2)
    return mx.put_along_axis(a, mx.broadcast_to(dst[:, None, :, None], (B, H, n, D)), moved, axis=2)


def _pad_columns(a: mx.array, size: int) -> mx.array:
    extra = size - a.shape[2]
    return a if extra == 0 else mx.pad(a, [(0, 0), (0, 0), (0, extra), (0, 0)])


def make_cache(num_layers: int, max_kv_size: int | None = None, keep: int = DEFAULT_KEEP):
    """Per-layer caches sharing one context. Returns (context, caches)."""
    ctx = CacheContext(max_kv_size, keep)
    return ctx, [MedusaKVCache(ctx) for _ in range(num_layers)]


def make_batch_cache(num_layers: int) -> tuple[BatchContext, list]:
    """Per-layer caches for a batch, empty until sequences join. Returns (context, caches)."""
    ctx = BatchContext()
    return ctx, [MedusaKVCache(ctx) for _ in range(num_layers)]
