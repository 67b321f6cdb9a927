"""Which committed slot holds which position, and who may see whom: numpy only,
shared by the MLX and torch caches.

Committed tokens live in slots: unbounded, or a window of ``max_kv_size - 1``
slots whose first ``keep`` hold the sink tokens while the rest rotate. A forward
writes its T new tokens (a tree, a prompt chunk, one token) to a scratch region
right after the used slots; ``plan_commit`` says where the accepted ones go.

Exactness with a window: mlx-lm's ``RotatingKVCache(max_size=W, keep)`` lets the
query at position q see the sinks and positions ``(q - (W - keep), q]``. The mask
applies that rule to every query, so a tree node at depth d never sees a
committed token that sequential decoding would already have evicted, and the
window needs only ``W - 1`` slots (the query itself sits in the scratch region).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_KEEP = 4  # mlx-lm's make_prompt_cache uses keep=4 with max_kv_size
PREFILL_STEP = 2048  # as mlx-lm: prompts are committed in chunks, bounding memory


@dataclass(frozen=True)
class CommitPlan:
    src: np.ndarray  # scratch indices to copy
    dst: np.ndarray  # slots they go to
    base: int  # where the scratch region started
    identity: bool  # already in place: nothing to move
    positions: np.ndarray  # absolute positions written
    count: int  # tokens committed (some may be overwritten at once in a tiny window)


@dataclass(frozen=True)
class ForwardPlan:
    positions: np.ndarray  # (T,) absolute positions of the new tokens
    contiguous: bool  # positions are committed + arange(T): a scalar RoPE offset works
    mask: np.ndarray | str | None  # (T, used+T) bool, or "causal" / None when implicit


class SlotMap:
    """Positions, slot map and masks for one sequence; the same for every layer."""

    def __init__(self, max_kv_size: int | None = None, keep: int = DEFAULT_KEEP):
        if max_kv_size is not None and max_kv_size < keep + 2:
            raise ValueError(f"max_kv_size {max_kv_size} is too small: it must be at least keep + 2 = {keep + 2}")
        self.window = max_kv_size
        self.keep = keep if max_kv_size is not None else 0
        self.ring = None if max_kv_size is None else max_kv_size - 1 - keep
        self.committed = 0  # tokens committed so far = position of the next one
        self.slot_pos = np.zeros(0, dtype=np.int64)  # position held by each used slot
        self.planned: int | None = None  # tokens the sequence will commit at most, if known (sizes static caches)

    @property
    def used(self) -> int:
        return len(self.slot_pos)

    @property
    def capacity(self) -> int | None:
        """Committed slots at most (None: unbounded)."""
        return None if self.window is None else self.window - 1

    def plan_forward(self, depths: np.ndarray | None = None, tree_mask: np.ndarray | None = None,
                     n: int = 1) -> ForwardPlan:
        """A tree (depths, tree_mask) or ``n`` contiguous tokens after the committed ones.

        A chain tree (node i at depth i) is planned as contiguous tokens."""
        if depths is None:
            depths = np.arange(n)
        depths = np.asarray(depths, dtype=np.int64)
        T = len(depths)
        q = self.committed + depths
        tri = np.tri(T, dtype=bool)
        chain = tree_mask is None or (np.array_equal(depths, np.arange(T)) and np.array_equal(tree_mask, tri))
        if chain:
            tree_mask = tri
        if self.window is None:
            if chain:
                return ForwardPlan(q, True, None if T == 1 else "causal")
            seen_slots = np.ones((T, self.used), dtype=bool)
            seen_new = tree_mask
        else:
            lo = (q - (self.window - self.keep))[:, None]  # positions (lo, q] are in the window
            sp = self.slot_pos[None, :]
            seen_slots = (sp < self.keep) | (sp > lo)
            seen_new = tree_mask & ((q[None, :] < self.keep) | (q[None, :] > lo))
            if chain and seen_slots.all() and np.array_equal(seen_new, tri):
                return ForwardPlan(q, True, None if T == 1 else "causal")
        return ForwardPlan(q, chain, np.concatenate([seen_slots, seen_new], axis=1))

    def dense(self, mask, T: int) -> np.ndarray:
        """(T, used+T) bool from a plan's mask (an array, "causal" or None)."""
        if isinstance(mask, np.ndarray):
            return mask
        new = np.tri(T, dtype=bool)  # "causal", or None when T == 1
        return np.concatenate([np.ones((T, self.used), dtype=bool), new], axis=1)

    def _slot(self, pos: np.ndarray) -> np.ndarray:
        if self.window is None:
            return pos
        return np.where(pos < self.keep, pos, self.keep + (pos - self.keep) % self.ring)

    def plan_commit(self, nodes, base: int | None = None) -> CommitPlan:
        """Where the accepted nodes (indices into the last forward, root first) go.

        ``base``: the column the forward wrote its first token at (default ``used``; in a batch,
        the longest row's ``used``: ``BatchSlots``)."""
        nodes = np.asarray(nodes, dtype=np.int64)
        m = len(nodes)
        pos = self.committed + np.arange(m)
        dst = self._slot(pos)
        # With a window shorter than the commit, only the last write to a slot counts.
        _, last = np.unique(dst[::-1], return_index=True)
        kept = np.sort(m - 1 - last)
        src, dst, pos = nodes[kept], dst[kept], pos[kept]
        base = self.used if base is None else base
        return CommitPlan(src, dst, base, bool(np.array_equal(dst, base + src)), pos, m)

    def apply_commit(self, plan: CommitPlan) -> None:
        end = max(self.used, int(plan.dst.max()) + 1) if len(plan.dst) else self.used
        slot_pos = np.full(end, -1, dtype=np.int64)
        slot_pos[: self.used] = self.slot_pos
        slot_pos[plan.dst] = plan.positions
        self.slot_pos = slot_pos
        self.committed += plan.count


def run_committed(ctx: SlotMap, caches, n: int, run, settle=None, step: int = PREFILL_STEP, check=None) -> list:
    """Run ``n`` contiguous tokens in chunks of ``step``, committing each chunk.

    ``run(s, e)`` computes tokens ``s:e`` after ``ctx.begin`` placed them;
    ``settle(out)`` runs after each commit (MLX evaluates there, bounding the graph);
    ``check()`` runs before each chunk and raises to stop (a cancelled request).
    Returns the chunks' outputs. The one prefill loop: decoding and the exo shards use it.
    """
    outs = []
    for s in range(0, n, step):
        if check is not None:
            check()
        e = min(n, s + step)
        ctx.begin(n=e - s)
        outs.append(run(s, e))
        ctx.commit(caches, np.arange(e - s))
        if settle is not None:
            settle(outs[-1])
    return outs
