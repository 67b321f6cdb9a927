"""Heads that know the plain greedy continuation: the rigging both backends' test fakes share (numpy only)."""

from __future__ import annotations

import numpy as np


def rig(rows: np.ndarray, nexts, future: np.ndarray, ranks, rng) -> np.ndarray:
    """Rig head logits in place and return them. rows: (1+K, T, V), row 0 the base model's.

    Head i at column t guesses position nexts[t] + 1 + i: the true token
    ``future[p]`` goes to a rank drawn from ``ranks`` (0 = top-1), the other
    tokens keep their order around it. Positions past ``future`` are left alone.
    """
    for t, q in enumerate(nexts):
        for i in range(rows.shape[0] - 1):
            p = int(q) + 1 + i
            if p < len(future):
                row = rows[1 + i, t]
                true = int(future[p])
                order = np.argsort(-row)
                order = order[order != true]
                r = int(rng.choice(ranks))
                ranked = np.concatenate([order[:r], [true], order[r:]])
                row[ranked] = np.linspace(10.0, 0.0, len(ranked))
    return rows


class OracleHeads:
    """Mixin for a MedusaModel of either backend: ``rigged(rows, one)`` puts the true
    continuation into the heads' logits at the positions of the states projected."""

    def __init__(self, base, heads, tree, future: np.ndarray, ranks=(0,), seed=0):
        # propose() skips project() with a draft vocabulary: the rig would silently not apply.
        assert getattr(heads, "draft_vocab", None) is None, "oracle heads rig project(); give heads without a draft"
        super().__init__(base, heads, tree)
        self.future, self.ranks = future, ranks
        self.rng = np.random.default_rng(seed)
        self.ctx = None

    def make_cache(self, *args, **kw):
        self.ctx, caches = super().make_cache(*args, **kw)
        return self.ctx, caches

    def hidden(self, tokens, caches, transposed=False):
        self.positions = self.node_positions(caches, len(tokens))  # the forward in flight
        return super().hidden(tokens, caches, transposed)

    def node_positions(self, caches, T: int) -> np.ndarray:
        """Absolute positions of the T tokens in flight (the backend's cache says)."""
        raise NotImplementedError

    def rigged(self, rows: np.ndarray, one: bool) -> np.ndarray:
        """rows: (1+K, V) at the last committed position (``one``), or (1+K, T, V) at each node in flight."""
        if one:  # after a commit: the bonus/root sits at ``committed``
            return rig(rows[:, None], [self.ctx.committed], self.future, self.ranks, self.rng)[:, 0]
        # the token after row n sits at its position + 1 (the rows are the last ones in flight, or
        # after a prefill the prompt's last position)
        return rig(rows, self.positions[-rows.shape[1]:] + 1, self.future, self.ranks, self.rng)


class OracleEngine:
    """Mixin for either backend's exo engine: the last shard's heads know the greedy continuation
    ``future``, so ring passes accept deep into the tree and commits gather non-contiguous nodes.
    A subclass gives ``back(rows, like)``: numpy rows to the backend's array."""

    def __init__(self, downloader, future, ranks, **kw):
        super().__init__(downloader, **kw)
        self.future, self.ranks, self.passes = future, ranks, 0
        self.rng = np.random.default_rng(0)

    def _load_backend(self, *args):
        loaded = super()._load_backend(*args)
        model, real = loaded.model, loaded.model.project

        def project(h, depth=None):  # rows: (1+D, T, V) at the rows the last shard reads
            rows = real(h, depth)
            nexts = self.row_positions[-rows.shape[1]:] + 1
            return self.back(rig(model.to_numpy(rows)[0], nexts, self.future, self.ranks, self.rng), rows)

        model.project = project
        return loaded

    def _load(self, *args):
        super()._load(*args)
        runner = self.runner
        if getattr(runner, "oracle", False):
            return
        emit = runner.emit

        def rigged(p, h):
            # The tree's nodes, or a plain run's last position (committed already).
            self.row_positions = p.root + p.req.depths if p.req.is_tree else np.array([p.root + h.shape[0] - 1])
            self.passes += 1
            return emit(p, h)

        runner.emit, runner.oracle = rigged, True


def take(gen, n):
    """The first n tokens a step generator emits, and the steps it took."""
    out, steps = [], 0
    for s in gen:
        out += s.tokens
        steps += 1
        if len(out) >= n:
            return out[:n], steps


def take_sized(gen, n):
    """The first n tokens a step generator emits, and the size of each tree it verified (the prefill's left out)."""
    out, sizes = [], []
    for s in gen:
        out += s.tokens
        sizes.append(s.tree_size)
        if len(out) >= n:
            return out[:n], sizes[1:]
