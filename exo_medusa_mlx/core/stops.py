"""Stop strings over a stream of text deltas: found across token boundaries, never emitted.

Text that could still grow into a stop string is held back until the next delta
rules it out (or the stream ends and ``flush`` releases it).
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached); after a stop, emit nothing more."""
        s = self.held + text
        hits = [i for i in (s.find(stop) for stop in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return s[: min(hits)], True
        keep = self._partial(s)
        self.held = s[len(s) - keep :]
        return s[: len(s) - keep], False

    def flush(self) -> str:
        """What was held back, once no more text will come."""
        out, self.held = self.held, ""
        return out

    def _partial(self, s: str) -> int:
        """The length of the longest end of ``s`` that begins a stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(s)), best, -1):
                if s.endswith(stop[:n]):
                    best = n
                    break
        return best
