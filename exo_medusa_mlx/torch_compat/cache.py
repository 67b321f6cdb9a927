"""The rotating-plus-tree KV cache for transformers models (twin of ``exo_medusa_mlx.cache``).

The slot bookkeeping and masks are the numpy ``SlotMap`` shared with MLX, so both
backends keep exactly the same window. One ``CacheContext`` is shared by all
layers; for the forward in flight it holds the tensors transformers takes:
``position_ids`` (1, T) and a 4D additive ``attention_mask`` (1, 1, T, used+T),
which transformers 5 passes to attention untouched. ``MedusaCache`` is a
transformers ``Cache`` whose layers write the T new keys/values into a scratch
region right after the used slots; ``commit`` gathers the accepted nodes' K/V
into their slots in every layer.

Static mode (``static.py``, what a CUDA graph replays) sets ``ctx.write``: the
layers then write the new keys/values at those slots of fixed-size buffers and
attention sees all of them (the mask hides the unused ones).

``BatchContext`` drives the same layers for B sequences at once
(``core/batch_slots.py``): ``position_ids`` (B, T), a mask (B, 1, T, S), per-row commits.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..core.batch_slots import BatchSlots
from ..core.slots import DEFAULT_KEEP, CommitPlan, SlotMap

__all__ = ["DEFAULT_KEEP", "BatchContext", "CacheContext", "MedusaCache", "MedusaKVLayer", "make_batch_cache",
           "make_cache", "staged", "to_device"]


def staged(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """``a`` as a host tensor to copy to ``device`` with ``non_blocking=True``: pinned on
    CUDA (torch's pinned allocator keeps it until the copy has run), so the host never waits."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.pin_memory() if device.type == "cuda" else t


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """``a`` on ``device``, copied without blocking the host."""
    return staged(a, device).to(device, non_blocking=True)


def commit_indices(plan: CommitPlan, device: torch.device) -> torch.Tensor:
    """(2, n) on ``device``: a commit's scratch slots (row 0) and the slots they go to (row 1), in one copy."""
    return to_device(np.stack([plan.base + plan.src, plan.dst]).astype(np.int64), device)


def additive(seen: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``seen``, the dtype's lowest value elsewhere: the float mask eager attention adds
    to the scores (sdpa takes the same)."""
    return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(~seen, torch.finfo(dtype).min)


class CacheContext(SlotMap):
    """The slot map plus the torch mask and positions of the forward in flight."""

    def __init__(self, max_kv_size: int | None = None, keep: int = DEFAULT_KEEP, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 implicit_causal: bool = False):
        """``implicit_causal``: attention treats a missing mask as causal (sdpa), so a
        first prompt chunk needs none."""
        super().__init__(max_kv_size, keep)
        self.device = torch.device(device)
        self.dtype = dtype
        self.implicit_causal = implicit_causal
        self.mask: torch.Tensor | None = None  # (1, 1, T, used+T) or (1, 1, T, S), additive
        self.positions: torch.Tensor | None = None  # (1, T) int64
        self.write: torch.Tensor | None = None  # (T,) slots the new K/V go to: static mode only

    def begin(self, depths: np.ndarray | None = None, tree_mask: np.ndarray | None = None, n: int = 1) -> None:
        """Prepare the forward of a tree (depths, tree_mask) or of ``n`` contiguous tokens."""
        plan = self.plan_forward(depths, tree_mask, n)
        T = len(plan.positions)
        self.write = None
        self.positions = to_device(plan.positions, self.device).view(1, T)
        if plan.mask is None or (isinstance(plan.mask, str) and self.used == 0 and self.implicit_causal):
            self.mask = None
        else:
            self.mask = additive(to_device(self.dense(plan.mask, T), self.device), self.dtype)[None, None]

    @torch.inference_mode()
    def commit(self, caches, nodes) -> None:
        """Keep the accepted ``nodes`` of the last forward in every layer's cache: one copy of
        the indices to the device, then one gather per layer."""
        plan = self.plan_commit(nodes)
        if not plan.identity:
            src, dst = commit_indices(plan, self.device)
            for c in caches:
                c.gather(src, dst)
        self.apply_commit(plan)


class BatchContext(BatchSlots):
    """The rows of a batch plus the torch mask and positions of the forward in flight."""

    write = None  # never static: ``MedusaKVLayer`` writes at the scratch column

    def __init__(self, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.device, self.dtype = torch.device(device), dtype
        self.mask: torch.Tensor | None = None  # (B, 1, T, used+T), additive
        self.positions: torch.Tensor | None = None  # (B, T) int64

    def begin(self, trees: list) -> None:
        """Prepare the forward of each row's tree (``TreeBuffers``), padded to the largest."""
        plan = self.plan_forward([(t.depths, t.mask) for t in trees])
        self.positions = to_device(plan.positions, self.device)
        if plan.mask is None:
            self.mask = None
            return
        T = plan.positions.shape[1]
        dense = plan.mask if isinstance(plan.mask, np.ndarray) else np.stack([r.dense(plan.mask, T) for r in self.rows])
        self.mask = additive(to_device(dense, self.device), self.dtype)[:, None]

    @torch.inference_mode()
    def commit(self, caches, nodes: list) -> None:
        """Keep each row's accepted ``nodes`` of the last forward in every layer's cache."""
        plan = self.plan_commit(nodes)
        if len(self.rows) == 1:
            one = plan.plans[0]
            if not one.identity:
                src, dst = commit_indices(one, self.device)
                for c in caches:
                    c.gather(src, dst)
        elif plan.src is not None:
            src, dst = to_device(plan.src, self.device), to_device(plan.dst, self.device)
            for c in caches:
                c.gather_rows(src, dst)
        self.apply_commit(plan)

    @torch.inference_mode()
    def join(self, caches, row: SlotMap, row_caches) -> None:
        """Add a sequence (its slot map and single-sequence caches, after its prefill) as the last row."""
        for c, r in zip(caches, row_caches):
            c.add_rows(r)
        self.add_row(row)

    @torch.inference_mode()
    def leave(self, caches, keep: list[int]) -> None:
        """Keep only the rows ``keep`` (in that order)."""
        for c in caches:
            c.select_rows(keep)
        self.keep_rows(keep)


class MedusaKVLayer(CacheLayerMixin):
    """One layer's K/V: used slots, then the scratch region of the current forward."""

    is_sliding = False
    step = 256

    def __init__(self, ctx: CacheContext):
        super().__init__()
        self.ctx = ctx

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def _resize(self, keys: torch.Tensor, values: torch.Tensor, end: int) -> None:
        B, H, T, Dk = keys.shape
        size = -(-end // self.step) * self.step
        if self.ctx.capacity is not None:
            size = min(size, self.ctx.capacity + T)
        new_k = keys.new_zeros(B, H, size, Dk)
        new_v = values.new_zeros(B, H, size, values.shape[3])
        if self.keys is not None:
            base = self.ctx.used
            new_k[:, :, :base] = self.keys[:, :, :base]
            new_v[:, :, :base] = self.values[:, :, :base]
        self.keys, self.values = new_k, new_v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new (B, Hkv, T, D) keys/values; return what attention sees."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        write = self.ctx.write
        if write is not None:  # static: fixed buffers, no host value read (a CUDA graph replays this)
            self.keys.index_copy_(2, write, key_states)
            self.values.index_copy_(2, write, value_states)
            return self.keys, self.values  # (B, Hkv, S, D)
        base = self.ctx.used
        end = base + key_states.shape[2]
        if self.keys is None or self.keys.shape[2] < end:
            self._resize(key_states, value_states, end)
        self.keys[:, :, base:end] = key_states
        self.values[:, :, base:end] = value_states
        return self.keys[:, :, :end], self.values[:, :, :end]  # (B, Hkv, used+T, D)

    def gather(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy slots ``src`` to ``dst`` (device index tensors); index_select copies first, so
        overlapping src/dst are safe."""
        if self.keys is None:
            return
        self.keys.index_copy_(2, dst, self.keys.index_select(2, src))
        self.values.index_copy_(2, dst, self.values.index_select(2, src))

    def gather_rows(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy columns ``src`` to ``dst``, each (B, n), row by row (gather copies first)."""
        if self.keys is None:
            return
        for a in (self.keys, self.values):
            shape = (*a.shape[:2], src.shape[1], a.shape[3])  # (B, H, n, D)
            a.scatter_(2, dst[:, None, :, None].expand(shape), a.gather(2, src[:, None, :, None].expand(shape)))

    def add_rows(self, other: "MedusaKVLayer") -> None:
        """Append ``other``'s rows; the shorter buffer is padded with zeros (finite: holes are masked)."""
        if self.keys is None:
            self.keys, self.values = other.keys, other.values
            self.device, self.is_initialized = other.device, True
            return
        size = max(self.keys.shape[2], other.keys.shape[2])
        pad = lambda a: torch.nn.functional.pad(a, (0, 0, 0, size - a.shape[2]))  # noqa: E731
        self.keys = torch.cat([pad(self.keys), pad(other.keys)])
        self.values = torch.cat([pad(self.values), pad(other.values)])

    def select_rows(self, keep: list[int]) -> None:
        if self.keys is None:
            return
        if not keep:
            self.keys = self.values = None
            return
        idx = torch.as_tensor(keep, dtype=torch.long, device=self.keys.device)
        self.keys, self.values = self.keys.index_select(0, idx), self.values.index_select(0, idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.ctx.used + query_length, 0

    def get_seq_length(self) -> int:
        return self.ctx.used

    def get_max_length(self) -> int:
        return -1 if self.ctx.capacity is None else self.ctx.capacity

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class MedusaCache(Cache):
    """A transformers ``Cache`` over ``MedusaKVLayer``s sharing one context."""

    def __init__(self, ctx: CacheContext, num_layers: int):
        super().__init__(layers=[MedusaKVLayer(ctx) for _ in range(num_layers)])
        self.ctx = ctx

    def __iter__(self):
        return iter(self.layers)


def make_cache(num_layers: int, max_kv_size: int | None = None, keep: int = DEFAULT_KEEP,
               **kwargs) -> tuple[CacheContext, MedusaCache]:
    """Per-layer caches sharing one context (``kwargs`` as ``CacheContext``). Returns (context, caches)."""
    ctx = CacheContext(max_kv_size, keep, **kwargs)
    return ctx, MedusaCache(ctx, num_layers)


def make_batch_cache(num_layers: int, **kwargs) -> tuple[BatchContext, MedusaCache]:
    """Per-layer caches for a batch, empty until sequences join (``kwargs`` as ``BatchContext``)."""
    ctx = BatchContext(**kwargs)
    return ctx, MedusaCache(ctx, num_layers)
