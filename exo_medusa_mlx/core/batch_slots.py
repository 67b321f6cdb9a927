"""Slot bookkeeping for a batch of sequences: one ``SlotMap`` per row, one scratch column for all.

Every row keeps its own committed slots (its offset, its window, its sinks: a window
may wrap in one row and not another). A forward writes every row's new tokens at
the same column, ``used`` (the longest row's used slots), so the keys are one
(B, heads, used+T, D) array; a row with fewer used slots has holes between its own
slots and that column, which its mask hides. Each row's tree is padded to the batch's
T with nodes that see only themselves (they are never read and never accepted, and
their keys stay finite, so a hole they leave never poisons attention). A commit
moves each row's accepted nodes from the scratch column to that row's own slots,
so rows advance by their own counts. numpy only, shared by the MLX and torch caches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .slots import CommitPlan, SlotMap


@dataclass(frozen=True)
class BatchForwardPlan:
    positions: np.ndarray  # (B, T) absolute positions of the new tokens, per row
    offsets: np.ndarray | None  # (B,) each row's first position, when every row is contiguous (a RoPE offset)
    mask: np.ndarray | str | None  # (B, T, used+T) bool, or "causal" / None when implicit for every row


@dataclass(frozen=True)
class BatchCommitPlan:
    plans: list[CommitPlan]  # each row's, its base the batch's scratch column
    src: np.ndarray | None  # (B, n) columns to copy from, per row; None: nothing moves
    dst: np.ndarray | None  # (B, n) columns they go to (a row with fewer moves repeats its last one)


def pad_tree(depths: np.ndarray, mask: np.ndarray, T: int) -> tuple[np.ndarray, np.ndarray]:
    """A tree padded to ``T`` nodes with nodes at depth 0 that see only themselves."""
    n = len(depths)
    if n == T:
        return depths, mask
    full = np.eye(T, dtype=bool)
    full[:n, :n] = mask
    return np.concatenate([depths, np.zeros(T - n, dtype=depths.dtype)]), full


class BatchSlots:
    """The rows of a batch, in batch order; ``used`` is where the next forward writes."""

    def __init__(self):
        self.rows: list[SlotMap] = []

    @property
    def used(self) -> int:
        """Columns before the scratch region: the longest row's used slots (0 when empty)."""
        return max((r.used for r in self.rows), default=0)

    @property
    def capacity(self) -> int | None:
        """Committed columns at most (None: some row is unbounded)."""
        caps = [r.capacity for r in self.rows]
        return None if not caps or None in caps else max(caps)

    def plan_forward(self, trees: list[tuple[np.ndarray, np.ndarray]]) -> BatchForwardPlan:
        """Each row's tree (depths (T_b,), tree mask (T_b, T_b)), padded to the largest."""
        if len(trees) != len(self.rows):
            raise ValueError(f"{len(trees)} trees for a batch of {len(self.rows)} rows")
        T, S = max(len(d) for d, _ in trees), self.used
        plans = [row.plan_forward(*pad_tree(np.asarray(d), np.asarray(m), T)) for row, (d, m) in zip(self.rows, trees)]
        positions = np.stack([p.positions for p in plans])
        offsets = positions[:, 0].copy() if all(p.contiguous for p in plans) else None
        kinds = {p.mask if isinstance(p.mask, (str, type(None))) else "array" for p in plans}
        if len(kinds) == 1 and kinds != {"array"} and all(r.used == S for r in self.rows):
            return BatchForwardPlan(positions, offsets, plans[0].mask)  # every row sees all it holds
        mask = np.zeros((len(plans), T, S + T), dtype=bool)
        for b, (row, p, (d, _)) in enumerate(zip(self.rows, plans, trees)):
            dense = row.dense(p.mask, T)  # (T, row.used + T)
            n = len(d)  # the padding nodes after them see themselves alone
            mask[b, :n, : row.used] = dense[:n, : row.used]
            mask[b, :, S:] = dense[:, row.used :]
        return BatchForwardPlan(positions, offsets, mask)

    def plan_commit(self, nodes: list[np.ndarray]) -> BatchCommitPlan:
        """Where each row's accepted nodes (indices into its tree in the last forward) go."""
        S = self.used
        plans = [row.plan_commit(n, base=S) for row, n in zip(self.rows, nodes)]
        moves = [0 if p.identity else len(p.src) for p in plans]
        if not any(moves):
            return BatchCommitPlan(plans, None, None)
        # Rows with fewer moves repeat their last one (the same value to the same column);
        # a row with none copies the scratch column onto itself.
        src = np.full((len(plans), max(moves)), S, dtype=np.int64)
        dst = src.copy()
        for b, (p, k) in enumerate(zip(plans, moves)):
            if k:
                src[b, :k], dst[b, :k] = S + p.src, p.dst
                src[b, k:], dst[b, k:] = src[b, k - 1], dst[b, k - 1]
        return BatchCommitPlan(plans, src, dst)

    def apply_commit(self, plan: BatchCommitPlan) -> None:
        for row, p in zip(self.rows, plan.plans):
            row.apply_commit(p)

    def add_row(self, row: SlotMap) -> None:
        self.rows.append(row)

    def keep_rows(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
