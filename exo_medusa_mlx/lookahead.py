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
- Dynamic plans: the next forward's shape is queued before the verdict is read, so
  every tree has the plan's most nodes (``DynamicTree.fixed``); which nodes, the best
  of the superset at the last accepted node, is chosen on the device by the order
  ``DynamicTree.pick`` uses, from the same scores the host reads.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .array_ops import to_numpy
from .cache import TreeOffset
from .core.dynamic import DynamicTree
from .core.step import Sequence, Verified, Verifier
from .core.tree import ROOT_ONLY

COMPACT_AT = 256  # holes gathered away once there are this many


def usable(tree, policy, ctx) -> bool:
    """Greedy acceptance, and for trees an unbounded cache (holes cannot rotate)."""
    return not policy.needs_logits and (tree.size == 1 or ctx.window is None)


class Lookahead(Verifier):
    def __init__(self, model, ctx, caches, plan, policy):
        self.dynamic = isinstance(plan, DynamicTree)
        super().__init__(model, ctx, caches, plan.fixed() if self.dynamic else plan, policy)
        tree = plan.superset if self.dynamic else plan  # a dynamic tree is accepted in its superset's terms
        ri = np.where(tree.retrieve_indices >= 0, tree.retrieve_indices, 0)  # (P, D+1)
        self._ri = mx.array(ri, dtype=mx.int32)
        self._on_path = mx.array(tree.retrieve_indices[:, 1:] >= 0)
        self._tree_mask = mx.array(tree.mask)
        self._depths = mx.array(tree.depths, dtype=mx.int32)
        self._nodes = mx.arange(tree.size, dtype=mx.int32)
        self._ranks = mx.arange(tree.depth + 1, dtype=mx.int32)
        self._chain = not self.dynamic and tree.is_chain
        self._queued = None  # (outputs of the step in flight, device state of the one after it)
        self._host_valid = np.ones(ctx.used, dtype=bool)  # slots of the steps read so far (trees)
        self._expected: tuple | None = None  # the next tree's tokens and nodes, as the device laid them out

    # ------------------------------------------------------------ the step on the device

    def _plain(self, token: mx.array):
        h = self.model.forward(self.ctx, self.caches, token, ROOT_ONLY)
        self.ctx.commit(self.caches, np.zeros(1, dtype=np.int64))
        y = mx.argmax(self.model.logits(h[-1]), axis=-1).reshape(1)
        return (y, None, None, y, None), y

    def _tree(self, tokens: mx.array, select: mx.array | None, pos: mx.array, valid: mx.array):
        """One verify queued: tokens (T,) on the tree of superset nodes ``select`` (dynamic) or the plan's."""
        ctx, T = self.ctx, self.plan.size
        depths = self._depths if select is None else self._depths[select]
        tree_mask = self._tree_mask if select is None else self._tree_mask[select][:, select]
        mask = mx.concatenate([mx.broadcast_to(valid[None], (T, ctx.used)), tree_mask], axis=1)
        ctx.begin_on_device(mask, pos if self._chain else TreeOffset(pos + depths))
        h = self.model.hidden(tokens, self.caches, transposed=self.model.transposes(T))
        ctx.keep_in_place(T)
        if select is None:
            logits, drafts = self.model.propose_tree(h, self.plan)  # (T, V), (T, T): each node's next tree
            scores, slot, present = None, self._nodes, None
        else:
            logits, drafts, scores = self.model.propose_scored(h, self.plan)  # (T, V), (T, S), (T, S)
            hit = select[None, :] == self._nodes[:, None]  # (S, T): superset node n is tree node t
            slot, present = mx.argmax(hit.astype(mx.int32), axis=1), hit.any(axis=1)  # (S,) where each sits, if it does
        argmax = mx.argmax(logits, axis=-1).astype(mx.int32)  # (T,)
        tok, arg = tokens[slot], argmax[slot]  # in the (super)tree's node numbering
        ok = self._on_path & (tok[self._ri[:, 1:]] == arg[self._ri[:, :-1]])  # (P, D)
        if present is not None:
            ok = ok & present[self._ri[:, 1:]]
        n_acc = mx.cumprod(ok.astype(mx.int32), axis=1).sum(axis=1)  # (P,)
        best = mx.argmax(n_acc)
        a = n_acc[best]
        path = self._ri[best]  # (D+1,)
        kept = ((self._nodes[None] == path[:, None]) & (self._ranks <= a)[:, None]).any(axis=0)
        last = slot[path[a]]
        if select is None:
            nxt, nsel = drafts[last].astype(mx.int32), None  # its root is argmax[last], the greedy bonus
        else:
            kept, nsel = kept[select], self._best(scores[last], T)
            nxt = drafts[last][nsel].astype(mx.int32)
        return (argmax, drafts, scores, nxt, nsel), (nxt, nsel, pos + a + 1, mx.concatenate([valid, kept]))

    def _best(self, score: mx.array, n: int) -> mx.array:
        """The ``n`` best superset nodes by ``score`` (S,), sorted: ``DynamicTree.pick``'s order
        (higher score, then the smaller node number)."""
        nodes = self._nodes
        ahead = nodes[None, :] < nodes[:, None]  # (S, S): m before n in the superset's order
        beats = (score[None, :] > score[:, None]) | ((score[None, :] == score[:, None]) & ahead)
        chosen = beats.sum(axis=1) < n  # (S,): fewer than n nodes come before it
        return mx.sort(mx.where(chosen, nodes, nodes + nodes.shape[0]))[:n]

    def _queue(self, state) -> None:
        out, nxt = self._plain(state) if self.plan.size == 1 else self._tree(*state)
        mx.async_eval(out, nxt)
        self._queued = (out, nxt)

    # ------------------------------------------------------------ the Verifier

    def verify(self, nxt: Sequence) -> Verified:
        if self._queued is None:
            dev = mx.array(nxt.tokens, dtype=mx.int32)
            select = None if nxt.select is None else mx.array(nxt.select, dtype=mx.int32)
            self._queue(dev if self.plan.size == 1 else
                        (dev, select, mx.array(self.ctx.committed, dtype=mx.int32),
                         mx.ones((self.ctx.used,), dtype=mx.bool_)))
        elif not (np.array_equal(nxt.tokens, self._expected[0]) and
                  (nxt.select is None or np.array_equal(nxt.select, self._expected[1]))):
            raise AssertionError(f"lookahead queued tree {self._expected[0].tolist()}, the host laid out "
                                 f"{nxt.tokens.tolist()}")
        (argmax, drafts, scores, nxt_tokens, nsel), state = self._queued
        self._queue(state)  # the next step, before this one is read
        argmax, drafts, scores, nxt_tokens, nsel = (None if a is None else to_numpy(a)
                                                    for a in (argmax, drafts, scores, nxt_tokens, nsel))
        self._expected = (nxt_tokens.astype(np.int64), nsel)
        return Verified(argmax, drafts, scores)

    def commit(self, nodes: np.ndarray) -> None:
        """The device kept what it accepted; the host keeps count of the holes."""
        if self.plan.size == 1:
            return  # each forward committed its token when it was queued
        kept = np.zeros(self.plan.size, dtype=bool)
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
        assert self.plan.size > 1, "a root-only step is never cut: its lookahead is never released"
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
        out, (tokens, select, pos, dev_valid) = self._queued
        self._queued = (out, (tokens, select, pos, dev_valid[mx.array(slots)]))
        self._host_valid = np.ones(int(valid.sum()), dtype=bool)
