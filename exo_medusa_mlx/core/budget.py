"""The tree budget of a batch: how many tree nodes each sequence verifies as the batch fills (numpy).

A batched step verifies B x T rows in one forward (T: the largest tree in the batch),
so its cost grows with B and T together: a tree that pays for one request stops paying
once the batch alone keeps the machine busy. ``BatchBudget`` keeps, for each batch size,
the tree size with the most expected tokens per unit of step cost,
E[accepted + 1](n) / cost(B, n); n = 1 (the root alone: plain decoding) is always a
candidate, so a batch step is never expected to be slower than the same batch decoded
plainly.

- cost(B, n): ``mlx_medusa tune``'s table of batched steps measured on this machine
  (``core.latency.measure_batch_latency``, saved as ``batch_latency`` in the tuned tree
  file), interpolated; without one, ``FREE_ROWS``' conservative rule.
- E(n) for a static tree: its n most probable nodes (an ancestor-closed prefix), each
  node's chance the product of the heads' recorded conditional accuracies along its path
  (``head_conditional_accuracy`` in the tree file; ``PRIOR_ACCURACY`` without one).
- A dynamic tree plan picks its own size each step from the heads' scores: at batch size B
  ``tree_for`` hands it this budget's ``relative_costs(B, N)`` as its cost curve
  (``plan_for``), so its picks shrink as the batch fills; ``pick`` takes any expected
  tokens by size.

A batch of one keeps the request's own tree: it was tuned for one request.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

import numpy as np

from .dynamic import DynamicTree
from .machine import this_machine
from .tree import ROOT_ONLY, TreeBuffers, build_tree

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16)  # what ``mlx_medusa tune`` measures
# Without a measured table: a forward of up to FREE_ROWS rows costs what one of FREE_ROWS rows
# does, and each row beyond costs its share. On the 2-core CPU this project is measured on, a batch
# of 8 single tokens is already near compute-bound (mlx-lm's own batching: 42 tok/s at 8 requests
# against 14 for one, so 8 rows cost 2.7 single steps), so from B = 8 a tree node costs as much as
# a request's token and, never accepted for sure, cannot pay: the root alone. Below, a tree keeps
# at most FREE_ROWS // B nodes (8 at B = 1, 4 at 2, 2 at 4), more only where the heads' expected
# tokens beat the extra rows.
FREE_ROWS = 8
# Without recorded accuracies: head d's rank-r guess is right with 0.35 / (r + 1)^1.5, given its
# parent was (the shipped SmolLM2 heads: 0.32-0.42 at rank 0, 0.08-0.12 at rank 1).
PRIOR_TOP1 = 0.35


def prior_accuracy(depth: int, topk: int) -> np.ndarray:
    """(depth, topk) conditional accuracies to assume when none were measured."""
    return np.tile(PRIOR_TOP1 / np.arange(1, topk + 1) ** 1.5, (max(depth, 1), 1))


class BatchCosts:
    """Seconds of one batched step by batch size and tree size, from a measured table.

    ``table``: {B: {T: seconds}} (keys may be strings, as JSON stores them). Between
    measured sizes the cost is linear in T and in B; past the largest T, linear at the last
    slope; past the largest B, the rows decide: cost(B, T) = cost(Bmax, T * B / Bmax).
    """

    def __init__(self, table: Mapping):
        rows = {}
        for b, curve in table.items():
            if not isinstance(curve, Mapping) or not curve:
                raise ValueError(f"batch_latency[{b}] must map tree sizes to seconds")
            t = {int(k): float(v) for k, v in curve.items()}
            if any(v <= 0 or not np.isfinite(v) for v in t.values()) or 1 not in t:
                raise ValueError(f"batch_latency[{b}] must hold positive seconds, tree size 1 included")
            rows[int(b)] = (np.array(sorted(t), dtype=np.float64), np.array([t[k] for k in sorted(t)]))
        if not rows or min(rows) < 1:
            raise ValueError("batch_latency must hold batch sizes >= 1")
        self.batches = np.array(sorted(rows), dtype=np.float64)
        self._rows = [rows[int(b)] for b in self.batches]

    def _at(self, i: int, nodes: np.ndarray) -> np.ndarray:
        keys, vals = self._rows[i]
        out = np.interp(nodes, keys, vals)
        if len(keys) >= 2:
            slope = (vals[-1] - vals[-2]) / (keys[-1] - keys[-2])
            out = np.where(nodes > keys[-1], vals[-1] + slope * (nodes - keys[-1]), out)
        return out

    def __call__(self, batch: int, nodes) -> np.ndarray:
        nodes = np.asarray(nodes, dtype=np.float64)
        bs = self.batches
        if batch >= bs[-1]:
            return self._at(len(bs) - 1, nodes * batch / bs[-1])
        if batch <= bs[0]:
            return self._at(0, nodes)
        j = int(np.searchsorted(bs, batch))  # bs[j-1] < batch <= bs[j]
        w = (batch - bs[j - 1]) / (bs[j] - bs[j - 1])
        return (1 - w) * self._at(j - 1, nodes) + w * self._at(j, nodes)


def default_costs(batch: int, nodes) -> np.ndarray:
    """``FREE_ROWS``' rule as a cost, in units of a forward of ``FREE_ROWS`` rows."""
    return np.maximum(batch * np.asarray(nodes, dtype=np.float64), FREE_ROWS) / FREE_ROWS


class BatchBudget:
    """Each sequence's tree at a batch size (``tree_for``, ``BatchGenerator``'s hook).

    Args:
        costs: ``costs(B, nodes)`` seconds (or any unit) of a batched step (a ``BatchCosts``);
            None: ``default_costs``.
        accuracy: (heads, topk) the heads' conditional accuracies; None: ``prior_accuracy``.
    """

    def __init__(self, costs=None, accuracy=None):
        self.costs = costs or default_costs
        self.accuracy = None if accuracy is None else np.asarray(accuracy, dtype=np.float64)
        self._trees: dict[tuple, TreeBuffers] = {}
        self._sizes: dict[tuple, int] = {}
        self._plans: dict[tuple, tuple[DynamicTree, DynamicTree]] = {}  # (id, B) -> (the plan, its batch copy)

    @classmethod
    def from_facts(cls, facts: dict, machine: dict) -> "BatchBudget":
        """From a tuned tree file's facts (``core.latency.tuned_facts``): its batch table where it was
        measured on ``machine`` (another machine's costs say nothing of this one), its accuracies."""
        table = facts.get("batch_latency") if facts.get("machine") == machine else None
        return cls(BatchCosts(table) if table else None, facts.get("head_conditional_accuracy"))

    @classmethod
    def for_model(cls, model) -> "BatchBudget":
        """The budget of a loaded model: the facts of the tree tuned beside its heads, which ``attach``
        keeps as ``model.facts`` (none: the default rule)."""
        return cls.from_facts(model.facts, this_machine(model.device))

    def relative_costs(self, batch: int, max_nodes: int) -> np.ndarray:
        """(max_nodes+1,) a batched step's cost by nodes per sequence, relative to the root alone ([0] unused)."""
        c = self.costs(batch, np.arange(max_nodes + 1))
        return c / c[1]

    def pick(self, batch: int, expected) -> int:
        """The node count with the most expected tokens per unit of cost at ``batch`` sequences.

        ``expected[i]``: expected tokens per step of a tree of i + 1 nodes (``expected[0]`` is 1).
        Ties go to the smaller tree."""
        expected = np.asarray(expected, dtype=np.float64)
        rate = expected / self.relative_costs(batch, len(expected))[1:]
        return int(np.argmax(rate >= rate.max() * (1 - 1e-9))) + 1

    def order(self, tree: TreeBuffers) -> tuple[list[tuple[int, ...]], np.ndarray]:
        """The tree's paths, most probable first (ancestors before descendants), and their chances."""
        acc = self.accuracy if self.accuracy is not None else prior_accuracy(tree.depth, tree.topk)
        probs = []
        for p in tree.choices:
            probs.append(float(np.prod([acc[d, r] if d < acc.shape[0] and r < acc.shape[1] else 0.0
                                        for d, r in enumerate(p)])))
        # A child is never more probable than its parent; on a tie the shorter path comes first.
        order = sorted(range(len(probs)), key=lambda i: (-probs[i], len(tree.choices[i]), tree.choices[i]))
        return [tree.choices[i] for i in order], np.array([probs[i] for i in order])

    def nodes(self, batch: int, tree: TreeBuffers) -> int:
        """How many of ``tree``'s nodes a sequence verifies in a batch of ``batch`` (all of them alone)."""
        if batch <= 1 or tree.size == 1:
            return tree.size
        key = (tree.choices, batch)
        if key not in self._sizes:
            _, probs = self.order(tree)
            self._sizes[key] = self.pick(batch, np.concatenate([[1.0], 1.0 + np.cumsum(probs)]))
        return self._sizes[key]

    def tree_for(self, batch: int, tree: TreeBuffers | DynamicTree) -> TreeBuffers | DynamicTree:
        """What a sequence proposes in a batch of ``batch``: a static ``tree`` cut to ``nodes(batch, tree)``
        nodes, a dynamic plan with the batch's cost curve (``plan_for``)."""
        if isinstance(tree, DynamicTree):
            return self.plan_for(batch, tree)
        return self.cut(tree, self.nodes(batch, tree))

    def plan_for(self, batch: int, plan: DynamicTree) -> DynamicTree:
        """``plan`` picking its sizes by a step's cost at ``batch`` sequences (alone: its own curve, as tuned).
        One copy per plan and batch size, so a batch's sequences stay one group for the verifier."""
        if batch <= 1:
            return plan
        known = self._plans.get((id(plan), batch))
        if known is None or known[0] is not plan:
            cost = self.relative_costs(batch, len(plan.cost) - 1)
            known = self._plans[(id(plan), batch)] = (plan, replace(plan, cost=cost))  # shares its subtree memo
        return known[1]

    def cut(self, tree: TreeBuffers, n: int) -> TreeBuffers:
        """``tree``'s ``n`` most probable nodes, root included (the tree itself when n covers it)."""
        if n >= tree.size:
            return tree
        if n <= 1:
            return ROOT_ONLY
        key = (tree.choices, n)
        if key not in self._trees:
            self._trees[key] = build_tree([list(p) for p in self.order(tree)[0][: n - 1]])
        return self._trees[key]


__all__ = ["DEFAULT_BATCH_SIZES", "FREE_ROWS", "BatchBudget", "BatchCosts", "default_costs", "prior_accuracy"]
