"""The verify step over a static cache, its step data computed on the device: what a CUDA graph replays.

After the prefill, the verify steps of one tree run over fixed buffers: every
layer's K/V in one (L, 2, B, Hkv, S, D) tensor, S sized to the request (the
window, else prompt + max tokens, plus the tree, rounded up to a bucket). Each
step copies one small host array to the device without blocking (the committed
length, then the tree's tokens); the RoPE positions, the write slots and the
(T, S) mask are computed from it there, with the tree's depths and mask kept on
the device. A commit is one such copy of its indices and one gather over all
layers. The host's ``SlotMap`` stays the one truth: from the committed length
the device computes what the slot map holds (window included), nothing is read back.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.step import Sequence, Verified, Verifier, read_arrays
from ..core.tree import TreeBuffers
from .cache import CacheContext, MedusaCache, additive, commit_indices, staged

BUCKET = 128  # static caches hold a multiple of this many slots
GROW = 256  # committed slots to leave room for when the request's length is unknown or passed


def static_size(ctx: CacheContext, tree_size: int) -> int:
    """Slots for the verify steps from now on: the committed slots the sequence reaches at most
    (the window; else the request's ``planned`` length; else room to grow) plus the tree, to a bucket."""
    most = ctx.planned if ctx.planned is not None and ctx.planned > ctx.used else ctx.used + GROW
    if ctx.capacity is not None:
        most = min(most, ctx.capacity)
    return -(-(max(most, ctx.used) + tree_size) // BUCKET) * BUCKET


class StaticKV:
    """All layers' keys and values in one (L, 2, B, Hkv, S, D) buffer; the layers hold views of it."""

    def __init__(self, caches: MedusaCache):
        self.caches = caches
        self.kv: torch.Tensor | None = None

    @property
    def size(self) -> int | None:
        return None if self.kv is None else self.kv.shape[4]

    def resize(self, S: int) -> None:
        """Move the used slots into a buffer of ``S`` slots (from the prefill's or a smaller one)."""
        layers, used = list(self.caches), self.caches.ctx.used
        k = layers[0].keys
        if k is None or any(layer.values.shape != layer.keys.shape for layer in layers):
            raise ValueError("the static cache needs every layer's keys and values, of one shape: prefill first")
        kv = k.new_zeros(len(layers), 2, *k.shape[:2], S, k.shape[3])
        for i, layer in enumerate(layers):
            kv[i, 0, :, :, :used] = layer.keys[:, :, :used]
            kv[i, 1, :, :, :used] = layer.values[:, :, :used]
            layer.keys, layer.values = kv[i, 0], kv[i, 1]
        self.kv = kv

    def gather(self, idx: torch.Tensor) -> None:
        """Copy slots ``idx[0]`` to ``idx[1]`` in every layer at once (index_select copies first)."""
        self.kv.index_copy_(4, idx[1], self.kv.index_select(4, idx[0]))


class DeviceSteps:
    """A T-node tree's step data on the device: positions, write slots and mask from the committed length.

    The tree's depths and mask sit in buffers of fixed address: ``set_tree`` refills them when
    a dynamic plan's next tree of the same size differs."""

    def __init__(self, ctx: CacheContext, tree: TreeBuffers, device: torch.device, dtype: torch.dtype):
        self.ctx, self.T, self.device, self.dtype = ctx, tree.size, device, dtype
        self.depths = torch.as_tensor(tree.depths, dtype=torch.long, device=device).clone()  # (T,)
        self.tree_mask = torch.as_tensor(tree.mask, device=device).clone()  # (T, T) bool
        self.tree = tree
        self.nodes = torch.arange(self.T, device=device)
        self.inputs = torch.zeros(1 + self.T, dtype=torch.long, device=device)  # [committed, tokens]: fixed address
        self.tokens = self.inputs[1:]
        self.slots: torch.Tensor | None = None  # (S,) arange

    def resize(self, S: int) -> None:
        self.slots = torch.arange(S, device=self.device)

    def set_tree(self, tree: TreeBuffers) -> None:
        """Lay out the next steps as ``tree`` (of this size), without blocking the host."""
        if tree is self.tree:
            return
        if tree.size != self.T:
            raise ValueError(f"a {tree.size}-node tree does not fit step data for {self.T} nodes")
        self.depths.copy_(staged(tree.depths.astype(np.int64), self.device), non_blocking=True)
        self.tree_mask.copy_(staged(tree.mask, self.device), non_blocking=True)
        self.tree = tree

    def send(self, tokens: np.ndarray) -> None:
        """The step's one host-to-device copy, not blocking the host: the committed length and the tokens."""
        a = np.concatenate([[self.ctx.committed], np.asarray(tokens, dtype=np.int64).reshape(-1)])
        self.inputs.copy_(staged(a, self.device), non_blocking=True)

    def derive(self) -> None:
        """``ctx.positions`` (1, T), ``ctx.write`` (T,) and ``ctx.mask`` (1, 1, T, S) from ``inputs``:
        device ops alone (a graph captures them). The same mask as ``SlotMap.plan_forward``."""
        ctx, T = self.ctx, self.T
        committed = self.inputs[0]
        used = committed if ctx.capacity is None else committed.clamp(max=ctx.capacity)
        q = committed + self.depths  # (T,) the nodes' positions
        rel = self.slots - used  # (S,) the node each scratch slot holds
        scratch = (rel >= 0) & (rel < T)
        node = rel.clamp(0, T - 1)
        seen = torch.where(scratch, self.tree_mask[:, node], self.slots < used)  # (T, S)
        if ctx.window is not None:
            seen &= self._in_window(committed, q, scratch, node)
        ctx.positions = q.view(1, T)
        ctx.write = used + self.nodes
        ctx.mask = additive(seen, self.dtype)[None, None]

    def _in_window(self, committed, q, scratch, node) -> torch.Tensor:
        """(T, S): the window's rule (``SlotMap``): query q sees the sinks and positions (q - (W - keep), q]."""
        ctx, s = self.ctx, self.slots
        # A ring slot s holds the last committed position p with p = s (mod ring).
        last = s + ctx.ring * torch.div(committed - 1 - s, ctx.ring, rounding_mode="floor")
        held = torch.where(s < ctx.keep, s, last)
        pos = torch.where(scratch, q[node], held)  # (S,) the position in each slot
        return (pos < ctx.keep) | (pos > (q - (ctx.window - ctx.keep))[:, None])


class StaticVerifier(Verifier):
    """The step's verifier over a static cache with device-side step data, run eagerly (any device).

    ``GraphedVerifier`` replays ``_run`` from a CUDA graph. The prefill ran with the
    dynamic cache; the first verify moves it into the static buffers. A dynamic plan's
    trees come in a few sizes (``DynamicTree.sizes``): step data (and a graph) per size.
    """

    def __init__(self, model, ctx: CacheContext, caches: MedusaCache, plan, policy):
        super().__init__(model, ctx, caches, plan, policy)
        self.kv = StaticKV(caches)
        self.by_size: dict[int, DeviceSteps] = {}
        self.steps: DeviceSteps | None = None  # the step in flight's

    def fit(self) -> bool:
        """Size the static cache for the next verify (room for the plan's largest tree); True when it was (re)sized."""
        if self.kv.size is not None and self.ctx.used + self.plan.size <= self.kv.size:
            return False
        S = static_size(self.ctx, self.plan.size)
        self.kv.resize(S)
        for steps in self.by_size.values():
            steps.resize(S)
        return True

    def verify(self, nxt: Sequence) -> Verified:
        return Verified(*self.model.to_numpy(*self.launch(nxt)))  # the step's one wait: the verdict

    def launch(self, nxt: Sequence) -> tuple:
        """A verify up to its outputs on the device; the host does not wait for the device here."""
        self.fit()
        steps = self.by_size.get(nxt.tree.size)
        if steps is None:
            steps = self.by_size[nxt.tree.size] = DeviceSteps(self.ctx, nxt.tree, self.model.device, self.model.dtype)
            steps.resize(self.kv.size)
        steps.set_tree(nxt.tree)
        steps.send(nxt.tokens)
        self.steps = steps
        return self._launch()

    def _launch(self) -> tuple:
        return self._run()

    @torch.inference_mode()
    def _run(self) -> tuple:
        """The verify forward and its read, as device arrays; reads no host value that changes per step."""
        steps = self.steps
        steps.derive()
        h = self.model.hidden(steps.tokens, self.caches, transposed=self.model.transposes(steps.T))
        return read_arrays(self.model, h, self.plan, self.policy.needs_logits)

    @torch.inference_mode()
    def commit(self, nodes: np.ndarray) -> None:
        plan = self.ctx.plan_commit(nodes)
        if not plan.identity:
            self.kv.gather(commit_indices(plan, self.kv.kv.device))
        self.ctx.apply_commit(plan)
