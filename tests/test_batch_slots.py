"""The batch's slot bookkeeping (numpy): every row sees exactly what it would see alone.

A brute-force simulation: each cache column holds the position written there. Rows with
their own windows (one wraps, one does not, one unbounded), trees of different sizes
padded to one T, random accepted paths; at every step, what each node of each row sees
in the batch (positions, through its mask) equals what it sees in its own single-sequence
cache, and the padding nodes see only themselves.
"""

import numpy as np
import pytest

from exo_medusa_mlx.core.batch_slots import BatchSlots, pad_tree
from exo_medusa_mlx.core.slots import SlotMap
from exo_medusa_mlx.core.tree import ROOT_ONLY, build_tree, tree_choices

TREES = [build_tree(tree_choices(t)) for t in ("cpu-8", "chain-3", "mc_sim_7b_63")] + [ROOT_ONLY]


def seen(mask_row: np.ndarray, cols: np.ndarray) -> list[int]:
    return sorted(cols[mask_row].tolist())


COLS = 2048  # columns of the simulated caches; -7 marks one never written


@pytest.mark.parametrize("seed", range(4))
def test_each_row_sees_what_it_would_alone(seed):
    rng = np.random.default_rng(seed)
    # (window, keep, prompt): some wrap, some never; two unbounded rows a slot apart, so one row's
    # commit reaches into the scratch column while another moves more nodes
    specs = [(12, 4, 5), (200, 4, 3), (None, 4, 30), (9, 0, 2), (None, 4, 29)]
    alone = [SlotMap(w, k) for w, k, _ in specs]
    batch = BatchSlots()
    for w, k, _ in specs:
        batch.add_row(SlotMap(w, k))
    mine = np.full((len(specs), COLS), -7)  # each row's own cache, alone
    for i, (_, _, n) in enumerate(specs):  # prompts, committed contiguous
        for sm in (alone[i], batch.rows[i]):
            sm.apply_commit(sm.plan_commit(np.arange(n)))
        mine[i, :n] = np.arange(n)
    cols = mine.copy()  # the batch's cache: rows are written at the longest row's column
    for _ in range(40):
        trees = [TREES[j] for j in rng.integers(len(TREES), size=len(specs))]
        plan = batch.plan_forward([(t.depths, t.mask) for t in trees])
        S, T = batch.used, plan.positions.shape[1]
        mask = plan.mask if isinstance(plan.mask, np.ndarray) else \
            np.stack([r.dense(plan.mask, T) for r in batch.rows])
        cols[:, S : S + T] = plan.positions
        nodes = []
        for b, (one, tree) in enumerate(zip(alone, trees)):
            p = one.plan_forward(tree.depths, tree.mask)
            mine[b, one.used : one.used + tree.size] = p.positions
            own = one.dense(p.mask, tree.size)
            assert np.array_equal(plan.positions[b, : tree.size], p.positions)
            for t in range(tree.size):
                assert seen(mask[b, t], cols[b, : S + T]) == seen(own[t], mine[b, : one.used + tree.size])
            for t in range(tree.size, T):  # padding: itself alone
                assert np.flatnonzero(mask[b, t]).tolist() == [S + t]
            path = tree.retrieve_indices[rng.integers(len(tree.retrieve_indices))]
            nodes.append(path[: rng.integers(1, (path >= 0).sum() + 1)])
        cp = batch.plan_commit(nodes)
        if cp.src is not None:
            moved = np.take_along_axis(cols, cp.src, axis=1)  # every row reads before any writes
            np.put_along_axis(cols, cp.dst, moved, axis=1)
        batch.apply_commit(cp)
        for b, (one, n) in enumerate(zip(alone, nodes)):
            c = one.plan_commit(n)
            mine[b][c.dst] = mine[b][c.base + c.src]
            one.apply_commit(c)
            assert np.array_equal(batch.rows[b].slot_pos, one.slot_pos)
            assert np.array_equal(cols[b, : one.used], mine[b][: one.used])
    assert batch.rows[0].committed > 3 * 12 and batch.rows[1].committed < 200  # one wrapped, one did not


def test_pad_tree_and_implicit_masks():
    tree = TREES[0]
    d, m = pad_tree(tree.depths, tree.mask, 11)
    assert d.tolist() == tree.depths.tolist() + [0, 0, 0] and np.array_equal(m[8:, 8:], np.eye(3, dtype=bool))
    assert not m[:8, 8:].any() and not m[8:, :8].any()
    rows = BatchSlots()
    for n in (5, 5):
        rows.add_row(SlotMap())
        rows.rows[-1].apply_commit(rows.rows[-1].plan_commit(np.arange(n)))
    plan = rows.plan_forward([(ROOT_ONLY.depths, ROOT_ONLY.mask)] * 2)
    assert plan.mask is None and plan.offsets.tolist() == [5, 5]  # aligned rows: implicit, as one sequence
    rows.rows[1].apply_commit(rows.rows[1].plan_commit(np.arange(2)))
    plan = rows.plan_forward([(ROOT_ONLY.depths, ROOT_ONLY.mask)] * 2)
    assert plan.mask.shape == (2, 1, 8) and plan.mask[0].tolist() == [[True] * 5 + [False] * 2 + [True]]
    with pytest.raises(ValueError, match="2 rows"):
        rows.plan_forward([(ROOT_ONLY.depths, ROOT_ONLY.mask)])
