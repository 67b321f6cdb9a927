"""Dynamic trees (``core/dynamic.py``), numpy only: the superset, the pick against a brute-force best-N,
the budget from the step's cost, the calibration fit, and the spec parsing."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from exo_medusa_mlx.core.dynamic import (Calibration, DynamicTree, best_choices, best_nodes, checked_spec,
                                         dynamic_nodes, fit_calibration, make_dynamic, plan_costs, step_costs,
                                         superset_paths)
from exo_medusa_mlx.core.growth import empirical_accept_length
from exo_medusa_mlx.core.tree import ROOT_ONLY, TreeBuffers

DEPTH, TOPK = 3, 4


def all_paths(depth: int, topk: int) -> list[tuple[int, ...]]:
    return [p for d in range(1, depth + 1) for p in itertools.product(range(topk), repeat=d)]


def head_logp(rng, depth: int = DEPTH, topk: int = TOPK, scale: float = 1.0) -> np.ndarray:
    """(depth, topk) log-probabilities of each head's top-k guesses: a random softmax, sorted best first."""
    z = rng.normal(size=(depth, 40)) * scale * rng.uniform(0.2, 3.0, size=(depth, 1))
    lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.sort(-lp, axis=-1)[:, :topk]


def path_score(lq: np.ndarray, p: tuple[int, ...]) -> float:
    return float(sum(lq[d, r] for d, r in enumerate(p)))


def superset_scores(plan: DynamicTree, lq: np.ndarray) -> np.ndarray:
    """What ``propose_scored`` computes on the device, in numpy: each superset node's path score."""
    return np.array([0.0] + [path_score(lq, p) for p in plan.superset.choices], dtype=np.float32)


def brute_best(lq: np.ndarray, n: int) -> list[tuple[int, ...]]:
    """The n-1 best paths of every path (and the root), ties to the shallower, then the smaller ranks."""
    scored = sorted(all_paths(*lq.shape), key=lambda p: (-np.float32(path_score(lq, p)), len(p), p))
    return sorted(scored[: n - 1], key=lambda p: (len(p), p))


def test_specs():
    assert dynamic_nodes("dynamic") == 16 and dynamic_nodes("dynamic:8") == 8
    assert dynamic_nodes("cpu-8") is None and dynamic_nodes([[0]]) is None and dynamic_nodes("dynamically") is None
    for bad in ("dynamic:0", "dynamic:x", "dynamic:", "dynamic:100000", "dynamic:-3"):
        with pytest.raises(ValueError, match="dynamic:N"):
            dynamic_nodes(bad)
    assert checked_spec("dynamic:4") == "dynamic:4" and isinstance(checked_spec("cpu-4"), TreeBuffers)
    with pytest.raises(ValueError, match="dynamic:N"):
        checked_spec("dynamic:zero")  # fails before any model loads
    assert best_nodes("best:5") == 5 and best_nodes("dynamic:5") is None and checked_spec("best:3") == "best:3"
    for bad in ("best", "best:", "best:0", "best:a"):
        with pytest.raises(ValueError, match="best:N"):
            checked_spec(bad)


def test_best_static_tree_of_a_size():
    """best:N names the static tree of N nodes that accepts the most, to compare a dynamic run of mean size N with."""
    facts = {"max_nodes_choices": [[0], [0, 0], [1], [2], [0, 0, 0]], "head_conditional_accuracy": [[0.5, 0.2]] * 3}
    assert best_choices(facts, 3) == [[0], [0, 0]] and best_choices(facts, 1) == []
    grown = best_choices({"head_conditional_accuracy": [[0.5, 0.2], [0.4, 0.1]]}, 4)  # past the tuned tree: grown
    assert len(grown) == 3 and grown[0] == [0]
    rng = np.random.default_rng(0)  # on rows drawn from those accuracies, no 4-node tree accepts more
    ranks = np.stack([rng.choice(3, size=4000, p=[0.5, 0.2, 0.3]), rng.choice(3, size=4000, p=[0.4, 0.1, 0.5])], 1)
    best = empirical_accept_length(ranks, grown)
    for other in ([[0], [1], [0, 0]], [[0], [1], [0, 1]], [[0], [0, 0], [0, 1]], [[0], [1], [1, 0]]):
        assert empirical_accept_length(ranks, other) <= best + 0.02
    with pytest.raises(ValueError, match="tuned tree file"):
        best_choices({}, 4)


@pytest.mark.parametrize("n", [2, 4, 8, 16, 40])
def test_the_superset_holds_every_possible_best_tree(n):
    """For any head probabilities (sorted by rank), the n best paths are in the superset; and every
    superset path is the best n for some probabilities (nothing in it is dead weight)."""
    sup = set(superset_paths(n, DEPTH, TOPK))
    rng = np.random.default_rng(n)
    for _ in range(200):
        assert set(brute_best(head_logp(rng, scale=rng.uniform(0.1, 5)), n)) <= sup
    for p in sup:  # p's dominators score 0 (probability 1), everything else -1 per rank: p is among the best
        lq = np.full((DEPTH, TOPK), -1.0)
        for d, r in enumerate(p):
            lq[d, : r + 1] = 0.0
        assert p in brute_best(lq, n)


@pytest.mark.parametrize("n", [3, 6, 12, 20])
def test_pick_is_the_brute_force_best_n(n):
    plan = make_dynamic(n, DEPTH, TOPK).fixed(n)
    rng = np.random.default_rng(n)
    for _ in range(100):
        lq = head_logp(rng, scale=rng.uniform(0.1, 5))
        tree, select = plan.pick(superset_scores(plan, lq))
        assert tree.choices == tuple(brute_best(lq, n)) and tree.size == n
        assert np.array_equal(np.sort(select), select) and select[0] == 0
        assert [plan.superset.choices[i - 1] for i in select[1:]] == list(tree.choices)


def test_ties_go_to_the_shallower_node_so_the_pick_is_a_tree():
    """Probability-1 guesses tie a child with its parent: the parent (shallower, earlier) goes first."""
    plan = make_dynamic(8, DEPTH, TOPK)
    lq = np.zeros((DEPTH, TOPK))  # every guess certain: every path scores 0
    for n in plan.sizes:
        tree, select = plan.fixed(n).pick(superset_scores(plan, lq))
        assert tree.size == n and list(select) == list(range(n))  # the superset's first n: shallowest first


def test_budget_from_the_cost_curve():
    rng = np.random.default_rng(0)
    cost = step_costs(16)  # 1 + 0.06 per extra node
    plan = make_dynamic(16, DEPTH, TOPK, cost)
    sizes = set()
    for _ in range(300):
        scores = superset_scores(plan, head_logp(rng, scale=rng.uniform(0.1, 5)))
        tree, _ = plan.pick(scores)
        assert tree.size in plan.sizes and tree.size <= 16
        # The size the pick chose has the most expected tokens per unit of cost among the sizes.
        best = sorted(scores[1:], reverse=True)
        rate = {n: (1 + np.exp(np.array(best[: n - 1], dtype=np.float64)).sum()) / cost[n] for n in plan.sizes}
        assert rate[tree.size] == pytest.approx(max(rate.values()))
        assert rate[tree.size] >= rate[1]  # never a tree expected slower than plain decoding
        sizes.add(tree.size)
    assert len(sizes) >= 4  # the size follows the heads' confidence


def test_root_alone_when_the_heads_are_unsure_and_the_most_nodes_when_sure():
    plan = make_dynamic(16, DEPTH, TOPK, step_costs(16))
    unsure = np.log(np.full((DEPTH, TOPK), 0.02))
    tree, select = plan.pick(superset_scores(plan, unsure))
    assert tree is ROOT_ONLY and select.tolist() == [0]
    sure = np.log(np.array([[0.97, 0.02, 0.005, 0.005]] * DEPTH))
    assert plan.pick(superset_scores(plan, sure))[0].choices == ((0,), (0, 0), (0, 0, 0))  # the chain pays
    # Free verification (a GPU's flat curve): every bucket costs the same, so the most nodes win.
    flat = make_dynamic(16, DEPTH, TOPK, np.ones(17))
    assert flat.pick(superset_scores(flat, unsure))[0].size == 16


def test_cost_curves():
    curve = {1: 0.010, 2: 0.011, 4: 0.013, 8: 0.017}
    c = step_costs(12, curve, plain=0.010)
    assert c[1] == pytest.approx(1.0) and c[2] == pytest.approx(1.1) and c[4] == pytest.approx(1.3)
    assert c[12] == pytest.approx(1.7 + 4 * 0.1)  # extended linearly past the last size
    assert step_costs(4)[4] == pytest.approx(1.18)
    facts = {"latency_curve": {str(k): v for k, v in curve.items()}, "plain_step": 0.010}
    assert np.allclose(plan_costs(facts, 8), step_costs(8, curve, 0.010))
    assert np.allclose(plan_costs({}, 8), step_costs(8))
    ring = plan_costs({**facts, "pass_overhead_ms": 10.0}, 8)  # a ring's transport: bigger trees cost less
    assert ring[8] == pytest.approx((0.017 + 0.010) / (0.010 + 0.010))


def test_calibration_fits_acceptance():
    """Rows whose true acceptance is 0.5 * p (head 0) and 0.9 * p ** 2 (head 1): the fit recovers both."""
    rng = np.random.default_rng(0)
    rows, k = 20000, 4
    p = np.sort(rng.dirichlet(np.ones(8) * 0.5, size=(rows, 2))[..., :k], axis=-1)[..., ::-1]  # (rows, 2, k)
    chance = np.stack([0.5 * p[:, 0], 0.9 * p[:, 1] ** 2], axis=1)  # sums to < 1 over the ranks
    u = rng.random((rows, 2, 1))
    ranks = np.where(u < chance.cumsum(-1), np.arange(k), k).min(-1)  # rank r with chance[r], else none of them
    cal = fit_calibration(np.log(p), ranks)
    got = np.exp([cal.log_rate(np.log(p[:, d]), d) for d in range(2)])  # (2, rows, k)
    assert np.abs(got - chance.transpose(1, 0, 2)).mean() < 0.01
    assert cal.power[0] == pytest.approx(1.0, abs=0.1) and cal.power[1] == pytest.approx(2.0, abs=0.2)
    assert np.exp(cal.log_scale[0]) == pytest.approx(0.5, abs=0.05)
    assert Calibration.from_json(cal.to_json(), 2) == Calibration(*(tuple(round(x, 4) for x in v)
                                                                     for v in (cal.log_scale, cal.power)))
    assert Calibration.from_json(None, 3) == Calibration.identity(3)
    lr = Calibration.identity(1).log_rate(np.log(np.array([0.3, 1.0])), 0)
    assert np.allclose(np.exp(lr), [0.3, 1.0]) and (Calibration((1.0,), (1.0,)).log_rate(np.zeros(1), 0) == 0).all()
