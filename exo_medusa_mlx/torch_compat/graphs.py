"""The static verify step (``static.py``) replayed from one CUDA graph: the torch fast path.

A decode step runs hundreds of small kernels; on a GPU their launch cost, not the
math, sets the speed at batch 1. Over the static cache every verify step of a
tree has the same shapes and tensor addresses, and its step data is computed on
the device from one buffer, so the forward, the mask and the read are captured
once and replayed (one graph per tree size: a dynamic plan's trees come in a few
sizes, their depths and mask refilled in place). The graphs are re-captured only
when the static cache is resized.
"""

from __future__ import annotations

import warnings

import torch

from .static import StaticVerifier

WARMUP = 2  # eager runs on a side stream before capture, as torch's docs ask


def capture(fn):
    """``fn`` (no arguments, fixed tensors) captured in a CUDA graph. Returns ``replay()``, which
    reruns the graph and returns the outputs captured (the same tensors, refilled)."""
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return lambda: (graph.replay(), out)[1]


class GraphedVerifier(StaticVerifier):
    """``StaticVerifier`` with ``_run`` (forward and read of every node) replayed from a CUDA graph."""

    device_type = "cuda"  # where ``capture`` works

    def __init__(self, model, ctx, caches, plan, policy):
        if model.device.type != self.device_type:
            raise ValueError(f"CUDA graphs need a CUDA model, this one is on {model.device}; use the eager path")
        super().__init__(model, ctx, caches, plan, policy)
        self.replays: dict[int, object] = {}  # per tree size: a dynamic plan's trees come in a few
        self.failed = False

    def fit(self) -> bool:
        resized = super().fit()
        if resized:
            self.replays.clear()  # the buffers moved: capture again
        return resized

    @torch.inference_mode()
    def _launch(self) -> tuple:
        if self.failed:
            return self._run()
        replay = self.replays.get(self.steps.T)
        if replay is None:
            try:  # the warm-up runs write only the scratch region: nothing committed changes
                replay = self.replays[self.steps.T] = capture(self._run)
            except RuntimeError as e:  # an op the graph cannot hold: stay correct, run eager
                warnings.warn(f"CUDA graph capture failed, decoding eagerly: {e}", RuntimeWarning, stacklevel=2)
                self.failed = True
                torch.cuda.synchronize()
                return self._run()
        return replay()


def fast_verifier(device: torch.device, fast_path: bool | None) -> type[StaticVerifier] | None:
    """The verifier class ``fast_path`` picks (None: the step's default verifier).

    None: graphs on CUDA, the default elsewhere. True: graphs on CUDA; elsewhere the
    same static step run eagerly (CUDA graphs exist on CUDA alone). False: the default.
    """
    if fast_path is False or (fast_path is None and device.type != "cuda"):
        return None
    return GraphedVerifier if device.type == "cuda" else StaticVerifier
