"""The rotating-plus-tree KV cache for transformers models (twin of ``exo_medusa_mlx.cache``).

The slot bookkeeping and masks are the numpy ``SlotMap`` shared with MLX, so both
backends keep exactly the same window. One ``CacheContext`` is shared by all
layers; for the forward in flight it holds the tensors transformers takes:
``position_ids`` (1, T) and a 4D additive ``attention_mask`` (1, 1, T, used+T),
which transformers 5 passes to attention untouched. ``MedusaCache`` is a
transformers ``Cache`` whose layers write the T new keys/values into a scratch
region right after the used slots; ``commit`` gathers the accepted nodes' K/V
into their slots in every layer.

Static mode (``static_len=S``, for CUDA graphs; it may be switched on after the
prefill): buffers hold exactly S slots, writes go
through an index tensor and attention always sees all S slots (the mask hides the
unused ones), so a forward of T tokens has one fixed shape and fixed tensor
addresses until S must grow (it doubles).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..core.slots import DEFAULT_KEEP, CommitPlan, SlotMap

STATIC_STEP = 256  # static caches grow to a multiple of this

__all__ = ["DEFAULT_KEEP", "CacheContext", "MedusaCache", "MedusaKVLayer", "make_cache"]


class CacheContext(SlotMap):
    """The slot map plus the torch mask and positions of the forward in flight."""

    def __init__(self, max_kv_size: int | None = None, keep: int = DEFAULT_KEEP, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 implicit_causal: bool = False, static_len: int | None = None):
        """``implicit_causal``: attention treats a missing mask as causal (sdpa), so a
        first prompt chunk needs none. ``static_len``: fixed slot count (static mode)."""
        super().__init__(max_kv_size, keep)
        self.device = torch.device(device)
        self.dtype = dtype
        self.implicit_causal = implicit_causal
        self.static_len = static_len
        self.mask: torch.Tensor | None = None  # (1, 1, T, used+T) or (1, 1, T, S), additive
        self.positions: torch.Tensor | None = None  # (1, T) int64
        self.write: torch.Tensor | None = None  # (T,) scratch slots, static mode only
        self._inputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def begin(self, depths: np.ndarray | None = None, tree_mask: np.ndarray | None = None, n: int = 1) -> None:
        """Prepare the forward of a tree (depths, tree_mask) or of ``n`` contiguous tokens."""
        plan = self.plan_forward(depths, tree_mask, n)
        T = len(plan.positions)
        if self.static_len is not None:
            self._begin_static(plan.positions, plan.mask, T)
            return
        self.positions = torch.from_numpy(plan.positions).to(self.device).view(1, T)
        if plan.mask is None or (isinstance(plan.mask, str) and self.used == 0 and self.implicit_causal):
            self.mask = None
        else:
            self.mask = self._additive(self._dense(plan.mask, T)).to(self.device)

    def _dense(self, mask, T: int) -> np.ndarray:
        """(T, used+T) bool from a plan's mask (an array, "causal" or None)."""
        if isinstance(mask, np.ndarray):
            return mask
        new = np.tri(T, dtype=bool)  # "causal", or None when T == 1
        return np.concatenate([np.ones((T, self.used), dtype=bool), new], axis=1)

    def _additive(self, seen: np.ndarray) -> torch.Tensor:
        # Eager attention adds the mask to the scores; sdpa takes the same float mask.
        neg = torch.finfo(self.dtype).min
        out = torch.zeros(seen.shape, dtype=self.dtype)
        out.masked_fill_(torch.from_numpy(~seen), neg)
        return out[None, None]  # (1, 1, T, K)

    def _begin_static(self, positions: np.ndarray, mask, T: int) -> None:
        if self.used + T > self.static_len:  # grow by doubling: few re-allocations (and graph captures)
            self.static_len = max(2 * self.static_len, -(-(self.used + T) // STATIC_STEP) * STATIC_STEP)
        S = self.static_len
        seen = np.zeros((T, S), dtype=bool)
        seen[:, : self.used + T] = self._dense(mask, T)
        if T not in self._inputs or self._inputs[T][1].shape[-1] != S:  # fixed addresses: graphs read these
            self._inputs[T] = (torch.zeros(1, T, dtype=torch.long, device=self.device),
                               torch.zeros(1, 1, T, S, dtype=self.dtype, device=self.device),
                               torch.zeros(T, dtype=torch.long, device=self.device))
        self.positions, self.mask, self.write = self._inputs[T]
        self.positions.copy_(torch.from_numpy(positions).view(1, T))
        self.mask.copy_(self._additive(seen))
        self.write.copy_(torch.arange(self.used, self.used + T))

    @torch.inference_mode()
    def commit(self, caches, nodes) -> None:
        """Keep the accepted ``nodes`` of the last forward in every layer's cache."""
        plan = self.plan_commit(nodes)
        for c in caches:
            c.apply(plan)
        self.apply_commit(plan)


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
        if self.ctx.static_len is not None:
            size = self.ctx.static_len
        else:
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
        base = self.ctx.used
        end = base + key_states.shape[2]
        S = self.ctx.static_len
        if self.keys is None or (self.keys.shape[2] < end if S is None else self.keys.shape[2] != S):
            self._resize(key_states, value_states, end)
        if S is not None:
            self.keys.index_copy_(2, self.ctx.write, key_states)
            self.values.index_copy_(2, self.ctx.write, value_states)
            return self.keys, self.values  # (B, Hkv, S, D)
        self.keys[:, :, base:end] = key_states
        self.values[:, :, base:end] = value_states
        return self.keys[:, :, :end], self.values[:, :, :end]  # (B, Hkv, used+T, D)

    def apply(self, plan: CommitPlan) -> None:
        if plan.identity or self.keys is None:
            return
        src = torch.from_numpy(plan.base + plan.src).to(self.keys.device)
        dst = torch.from_numpy(plan.dst).to(self.keys.device)
        # index_select copies first, so overlapping src/dst are safe.
        self.keys.index_copy_(2, dst, self.keys.index_select(2, src))
        self.values.index_copy_(2, dst, self.values.index_select(2, src))

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
