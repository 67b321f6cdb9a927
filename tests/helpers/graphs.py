"""A stand-in for CUDA graphs on a CPU, to test ``GraphedVerifier``'s flow without a GPU (torch only)."""

from __future__ import annotations

from exo_medusa_mlx.torch_compat.graphs import GraphedVerifier


class StandInCapture:
    """Replaces ``graphs.capture``: a capture runs ``fn`` once and keeps its outputs (``captured``); a
    replay runs ``fn`` again and refills them in place, as a graph refills the outputs it captured."""

    def __init__(self):
        self.captured: list = []

    def __call__(self, fn):
        out = fn()
        self.captured.append(out)

        def replay():
            for o, new in zip(out, fn()):
                if o is not None:
                    o.copy_(new)
            return out
        return replay


class CpuGraphed(GraphedVerifier):
    """``GraphedVerifier`` allowed on a CPU (with ``StandInCapture``)."""

    device_type = "cpu"
