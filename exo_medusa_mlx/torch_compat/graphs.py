"""The verify forward of a fixed tree as one CUDA graph (CUDA only; eager elsewhere).

A decode step runs hundreds of small kernels; on a GPU their launch cost, not the
math, sets the speed at batch 1. With the cache in static mode every verify step
of a tree has the same shapes and tensor addresses, so it is captured once and
replayed. The graph is re-captured only when the static cache doubles.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..core.step import Verified, Verifier
from ..core.tree import TreeBuffers
from .cache import STATIC_STEP, CacheContext, MedusaCache
from .model import MedusaModel

WARMUP = 2  # eager runs on a side stream before capture, as torch's docs ask


def static_len_for(ctx: CacheContext, tree_size: int) -> int:
    """Static slots for verify steps after the committed ones: the window, else room to decode."""
    need = (ctx.capacity if ctx.capacity is not None else ctx.used + STATIC_STEP) + tree_size
    return -(-need // STATIC_STEP) * STATIC_STEP


class GraphedVerifier(Verifier):
    """The step's verifier with ``model.forward`` and the proposal over ``tree``
    replayed from a CUDA graph (``core.step.read`` of every node, on the device).

    The prefill ran with a dynamic cache; the verify steps switch it to static mode.
    """

    def __init__(self, model: MedusaModel, ctx: CacheContext, caches: MedusaCache, tree: TreeBuffers, policy):
        super().__init__(model, ctx, caches, tree, policy)
        if model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, this one is on {model.device}; use the eager path")
        ctx.static_len = static_len_for(ctx, tree.size)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.captured_len: int | None = None
        self.tokens = torch.zeros(tree.size, dtype=torch.long, device=model.device)
        self.failed = False

    def _run(self):
        h = self.model.hidden(self.tokens, self.caches)  # (T, H)
        if self.tree.size > 1:
            logits, drafts = self.model.propose_tree(h, self.tree)
        else:
            logits, drafts = self.model.lm_head(h), None
        return (logits if self.policy.needs_logits else logits.argmax(-1)), drafts

    def _capture(self) -> None:
        self.graph = None
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                self._run()  # writes only the scratch region: nothing committed changes
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.out = self._run()
        self.graph, self.captured_len = graph, self.ctx.static_len

    @torch.inference_mode()
    def _replay(self):
        if self.failed:
            return self._run()
        if self.graph is None or self.captured_len != self.ctx.static_len:
            try:
                self._capture()
            except RuntimeError as e:  # an op the graph cannot hold: stay correct, run eager
                warnings.warn(f"CUDA graph capture failed, decoding eagerly: {e}", RuntimeWarning, stacklevel=2)
                self.failed, self.graph = True, None
                torch.cuda.synchronize()
                return self._run()
        self.graph.replay()
        return self.out

    def verify(self, tokens: np.ndarray) -> Verified:
        self.ctx.begin(self.tree.depths, self.tree.mask)  # fills the static positions / mask / write index
        self.tokens.copy_(torch.from_numpy(np.asarray(tokens, dtype=np.int64)))
        return Verified(*self.model.to_numpy(*self._replay()))


def use_graphs(model: MedusaModel, graphs: bool | None) -> bool:
    """``graphs``: None picks CUDA graphs on CUDA devices; True insists (and fails off CUDA)."""
    if graphs is None:
        return model.device.type == "cuda"
    if graphs and model.device.type != "cuda":
        raise ValueError(f"graphs=True needs a CUDA model, this one is on {model.device}; pass graphs=None")
    return graphs

