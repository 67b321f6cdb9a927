"""The verify forward of a fixed tree as one CUDA graph (CUDA only; eager elsewhere).

A decode step runs hundreds of small kernels; on a GPU their launch cost, not the
math, sets the speed at batch 1. With the cache in static mode every verify step
of a tree has the same shapes and tensor addresses, so it is captured once and
replayed. The graph is re-captured only when the static cache doubles.
"""

from __future__ import annotations

import warnings

import torch

from ..tree import TreeBuffers
from .cache import STATIC_STEP, CacheContext, MedusaCache
from .model import MedusaModel

WARMUP = 2  # eager runs on a side stream before capture, as torch's docs ask


def static_len_for(ctx: CacheContext, tree_size: int) -> int:
    """Static slots for verify steps after the committed ones: the window, else room to decode."""
    need = (ctx.capacity if ctx.capacity is not None else ctx.used + STATIC_STEP) + tree_size
    return -(-need // STATIC_STEP) * STATIC_STEP


class GraphedVerify:
    """``model.forward`` then the logits over ``tree``, replayed from a CUDA graph.

    Call it like ``model.forward`` (tokens: (T,) on the device); returns (logits
    (T, V), guesses (D, T, k)): ``model.propose`` of every node with ``heads``
    (the tree's depth D, its top-k), else the base logits and None. Both are
    static buffers overwritten by the next call.
    """

    def __init__(self, model: MedusaModel, ctx: CacheContext, caches: MedusaCache, tree: TreeBuffers,
                 heads: bool = False):
        if model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, this one is on {model.device}; use the eager path")
        if ctx.static_len is None:
            raise ValueError("CUDA graphs need a static cache: make_cache(..., static_len=S)")
        self.model, self.ctx, self.caches, self.tree, self.heads = model, ctx, caches, tree, heads
        self.graph: torch.cuda.CUDAGraph | None = None
        self.captured_len: int | None = None
        self.tokens = torch.zeros(1, tree.size, dtype=torch.long, device=model.device)
        self.failed = False

    def _begin(self) -> None:
        if self.tree.is_chain:
            self.ctx.begin(n=self.tree.size)
        else:
            self.ctx.begin(self.tree.depths, self.tree.mask)

    def _run(self):
        h = self.model.hidden(self.tokens, self.caches)[0]  # (T, H)
        if self.heads:
            return self.model.propose(h, self.tree.depth, self.tree.topk)
        return self.model.lm_head(h), None

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
            self.logits, self.guesses = self._run()
        self.graph, self.captured_len = graph, self.ctx.static_len

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.numel() != self.tokens.numel():
            raise ValueError(f"graphed verify takes {self.tokens.numel()} tree tokens, got {tokens.numel()}")
        self._begin()  # fills the static positions / mask / write index (may grow the cache)
        self.tokens.copy_(tokens.view(1, -1))
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
        return self.logits, self.guesses


def use_graphs(model: MedusaModel, graphs: bool | None) -> bool:
    """``graphs``: None picks CUDA graphs on CUDA devices; True insists (and fails off CUDA)."""
    if graphs is None:
        return model.device.type == "cuda"
    if graphs and model.device.type != "cuda":
        raise ValueError(f"graphs=True needs a CUDA model, this one is on {model.device}; pass graphs=None")
    return graphs

