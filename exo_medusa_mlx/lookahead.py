"""MLX's fast path for greedy decoding: verify one step ahead of the host.

The host's part of a step (read the verdict, accept, lay out the next tree)
otherwise leaves the device idle every step. ``Lookahead`` is a ``Verifier`` that,
before reading step n, queues step n+1 from step n's verdict computed on the
device, as mlx-lm pipelines plain decoding; the step loop in ``core/step.py`` is
unchanged and checks that the host's next tree is the one queued.

- Plain decoding (the root-only tree): the next token is the device's argmax and
  each forward commits its token at once. Any cache, on every device.
- Trees (unbounded cache): so that the next forward does not depend on how many
  tokens were accepted, each forward's nodes stay in the slots they were written
  to; rejected ones become holes, hidden from later queries by a mask computed on
  the device (as are the RoPE positions), and gathered away once there are
  ``COMPACT_AT`` of them. Greedy acceptance on the device keeps the longest path
  whose candidates equal the base model's argmax, as ``greedy_accept`` does.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .array_ops import to_numpy
from .cache import TreeOffset
from .core.step import Verified, Verifier

COMPACT_AT = 256  # holes gathered away once there are this many


def usable(tree, policy, ctx) -> bool:
    """Greedy acceptance, and for trees an unbounded cache (holes cannot rotate)."""
    return not policy.needs_logits and (tree.size == 1 or ctx.window is None)


class Lookahead(Verifier):
    def __init__(self, model, ctx, caches, tree, policy):
        super().__init__(model, ctx, caches, tree, policy)
        T, D = tree.size, tree.depth
        ri = np.where(tree.retrieve_indices >= 0, tree.retrieve_indices, 0)  # (P, D+1)
        self._ri = mx.array(ri, dtype=mx.int32)
        self._on_path = mx.array(tree.retrieve_indices[:, 1:] >= 0)
        self._tree_mask = mx.array(tree.mask)
        self._depths = mx.array(tree.depths, dtype=mx.int32)
        self._nodes = mx.arange(T, dtype=mx.int32)
        self._ranks = mx.arange(D + 1, dtype=mx.int32)
        self._queued = None  # (outputs of the step in flight, device state of the one after it)
        self._host_valid = np.ones(ctx.used, dtype=bool)  # slots of the steps read so far (trees)
        self._expected: np.ndarray | None = None  # the next tree's tokens, as the device laid them out

    # ------------------------------------------------------------ the step on the device

    def _plain(self, token: mx.array):
        h = self.model.forward(self.ctx, self.caches, token, self.tree)
        self.ctx.commit(self.caches, np.zeros(1, dtype=np.int64))
        y = mx.argmax(self.model.logits(h[-1]), axis=-1).reshape(1)
        return (y, None, y), y

    def _tree(self, tokens: mx.array, pos: mx.array, valid: mx.array):
        ctx, tree = self.ctx, self.tree
        mask = mx.concatenate([mx.broadcast_to(valid[None], (tree.size, ctx.used)), self._tree_mask], axis=1)
        ctx.begin_on_device(mask, pos if tree.is_chain else TreeOffset(pos + self._depths))
        h = self.model.hidden(tokens, self.caches, transposed=self.model.transposes(tree.size))
        ctx.keep_in_place(tree.size)
        logits, drafts = self.model.propose_tree(h, tree)  # (T, V), (T, T): each node's next tree
        argmax = mx.argmax(logits, axis=-1).astype(mx.int32)  # (T,)
        ok = self._on_path & (tokens[self._ri[:, 1:]] == argmax[self._ri[:, :-1]])  # (P, D)
        n_acc = mx.cumprod(ok.astype(mx.int32), axis=1).sum(axis=1)  # (P,)
        best = mx.argmax(n_acc)
        a = n_acc[best]
        path = self._ri[best]  # (D+1,)
        last = path[a]
        kept = ((self._nodes[None] == path[:, None]) & (self._ranks <= a)[:, None]).any(axis=0)  # (T,)
        nxt = drafts[last].astype(mx.int32)  # its root is argmax[last], the greedy bonus
        return (argmax, drafts, nxt), (nxt, pos + a + 1, mx.concatenate([valid, kept]))

    def _queue(self, state) -> None:
        out, nxt = self._plain(state) if self.tree.size == 1 else self._tree(*state)
        mx.async_eval(out, nxt)
        self._queued = (out, nxt)

    # ------------------------------------------------------------ the Verifier

    def verify(self, tokens: np.ndarray) -> Verified:
        if self._queued is None:
            dev = mx.array(tokens, dtype=mx.int32)
            self._queue(dev if self.tree.size == 1 else
                        (dev, mx.array(self.ctx.committed, dtype=mx.int32), mx.ones((self.ctx.used,), dtype=mx.bool_)))
        elif not np.array_equal(tokens, self._expected):
            raise AssertionError(f"lookahead queued tree {self._expected.tolist()}, the host laid out {tokens.tolist()}")
        (argmax, drafts, nxt), state = self._queued
        self._queue(state)  # the next step, before this one is read
        argmax, drafts, nxt = (None if a is None else to_numpy(a) for a in (argmax, drafts, nxt))
        self._expected = nxt.astype(np.int64)
        return Verified(argmax, drafts)

    def commit(self, nodes: np.ndarray) -> None:
        """The device kept what it accepted; the host keeps count of the holes."""
        if self.tree.size == 1:
            return  # each forward committed its token when it was queued
        kept = np.zeros(self.tree.size, dtype=bool)
        kept[nodes] = True
        self._host_valid = np.concatenate([self._host_valid, kept])
        if len(self._host_valid) - int(self._host_valid.sum()) >= COMPACT_AT:
            self._compact()

    def release(self) -> None:
        """Drop the step in flight and gather the kept tokens to the front, in order: the
        cache then holds the committed sequence alone, as the plain ``Verifier`` keeps it.

        Only a tree is ever cut at the context's end (the step loop then switches verifiers);
        the step in flight may have run its deepest nodes past the end: it is thrown away.
        """
        assert self.tree.size > 1, "a root-only step is never cut: its lookahead is never released"
        if self._queued is None:
            return
        kept = np.flatnonzero(self._host_valid)  # the in-flight step's slots lie beyond
        self.ctx.compact(self.caches, kept)
        # Unbounded (``usable``): slot i now holds position i, and the device kept the count alone.
        self.ctx.slot_pos = np.arange(len(kept), dtype=np.int64)
        self.ctx.committed = len(kept)
        self._queued = None

    def _compact(self) -> None:
        """Gather the holes away; the step in flight keeps all its slots."""
        valid = self._host_valid
        slots = np.concatenate([np.flatnonzero(valid), np.arange(len(valid), self.ctx.used)])
        self.ctx.compact(self.caches, slots)
        out, (tokens, pos, dev_valid) = self._queued
        self._queued = (out, (tokens, pos, dev_valid[mx.array(slots)]))
        self._host_valid = np.ones(int(valid.sum()), dtype=bool)
