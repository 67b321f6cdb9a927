"""Oracle heads for batches and a fake tokenizer (numpy only): each sequence's heads know its own
greedy continuation.

``OracleHeads`` (oracle.py) knows one continuation; in a batch every row needs its own,
and rows come and go. A sequence is recognised by its prompt's first token when its
prefill begins; its slot map (its row of the batch cache) carries it from then on. The
rows a read passes to ``project`` (all of the batch's, or a group's) are recognised by
their hidden states, copies of the forward's.
"""

from __future__ import annotations

import numpy as np

from oracle import rig


class BatchOracleHeads:
    """Mixin for either backend's MedusaModel. ``futures``: {a prompt's first token: prompt + its
    greedy continuation}. A backend subclass gives ``context(caches)`` (the cache's context),
    ``positions(caches, B, T)`` ((B, T) positions of the forward in flight) and ``host(a)``
    (an array as numpy), and calls ``rigged(rows, h)`` from ``project``."""

    def __init__(self, base, heads, tree, futures: dict[int, np.ndarray], ranks=(0, 1), seed=0):
        assert getattr(heads, "draft_vocab", None) is None, "oracle heads rig project(); give heads without a draft"
        super().__init__(base, heads, tree)
        self.futures, self.ranks = futures, ranks
        self.rng = np.random.default_rng(seed)
        self.row_future: dict[int, np.ndarray] = {}  # id(slot map) -> its sequence's future
        self.inflight: list[tuple[np.ndarray, np.ndarray]] = []  # per row: (future, positions (T,))
        self.states = None  # (B, T, H) the forward's hidden states
        self.batched = False  # a batch's forward (trees: first rows) or a prefill chunk (the last row is read)

    def hidden(self, tokens, caches, transposed=False):
        ctx = self.context(caches)
        self.batched = hasattr(ctx, "rows")
        rows = ctx.rows if self.batched else [ctx]
        T = tokens.shape[-1]
        if not self.batched and ctx.committed == 0:
            self.row_future[id(ctx)] = self.futures[int(self.host(tokens).reshape(-1)[0])]
        pos = self.positions(caches, len(rows), T)
        self.inflight = [(self.row_future[id(r)], pos[b]) for b, r in enumerate(rows)]
        h = super().hidden(tokens, caches, transposed)
        self.states = self.host(h).reshape(len(rows), T, -1)
        return h

    def rigged(self, rows: np.ndarray, h: np.ndarray) -> np.ndarray:
        """rows: (1+K, ..., T', V) at ``h`` (..., T', H): one row's nodes, or a group of rows'."""
        if not self.batched:  # the prompt's last position
            fut, pos = self.inflight[0]
            return rig(rows, pos[-rows.shape[-2] :] + 1, fut, self.ranks, self.rng)
        group = rows if rows.ndim == 4 else rows[:, None]
        for i, state in enumerate(h.reshape(-1, *h.shape[-2:])):
            b = next(b for b in range(len(self.inflight)) if np.array_equal(self.states[b, 0], state[0]))
            fut, pos = self.inflight[b]
            rig(group[:, i], pos[: group.shape[2]] + 1, fut, self.ranks, self.rng)
        return rows


class Detok:
    def __init__(self):
        self.reset()

    def reset(self):
        self.pending = ""

    def add_token(self, t):
        self.pending += f"<{t}>"

    def finalize(self):
        pass

    @property
    def last_segment(self):
        """The text since the last call, as mlx-lm's detokenizers give it."""
        out, self.pending = self.pending, ""
        return out


class Tokenizer:
    """Token t reads "<t>"; a fresh detokenizer per request, as mlx-lm's wrapper gives."""

    def __init__(self, eos=-1):
        self.eos_token_ids, self.eos_token_id, self.bos_token = [eos], eos, None

    @property
    def detokenizer(self):
        return Detok()

    def encode(self, text, add_special_tokens=True):
        return [int(x) for x in text.split()]


def prompts_of(lengths, seed=0):
    """Prompts of these lengths whose first tokens differ (the oracle tells sequences apart by them)."""
    rng = np.random.default_rng(seed)
    return [np.concatenate([[first], rng.integers(0, 96, n - 1)]) for first, n in zip(rng.permutation(96), lengths)]


def run(gen, uids=None, until=None) -> dict[int, list]:
    """Every response per uid, until no request is left (or ``until(out)``)."""
    out: dict[int, list] = {u: [] for u in uids or []}
    while responses := gen.next():
        for r in responses:
            out.setdefault(r.uid, []).append(r)
        if until is not None and until(out):
            break
    return out


def tokens(rs) -> list[int]:
    return [r.token for r in rs]
