"""Dynamic trees (``core/dynamic.py``): the superset, the pick against a brute-force best-N, the budget
from the step's cost, the calibration fit, and the spec parsing (numpy only); then decoding with them on
MLX, losslessly wherever the step runs: ``generate_step`` (with a window, next-token heads and a draft
vocabulary), the lookahead fast path, and an exo ring; the scores the device computes are the heads'
calibrated path log-probabilities. (The torch twin's are in test_torch_static.py.)"""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest

from exo_medusa_mlx.core.dynamic import (Calibration, DynamicTree, best_choices, best_nodes, checked_spec,
                                         dynamic_nodes, fit_calibration, make_dynamic, plan_costs, step_costs,
                                         superset_paths)
from exo_medusa_mlx.core.growth import empirical_accept_length
from exo_medusa_mlx.core.step import generate_step
from exo_medusa_mlx.core.tree import ROOT_ONLY, TreeBuffers
from exo_medusa_mlx.exo import LocalShardDownloader, MedusaMLXInferenceEngine, Shard, run_ring
from exo_medusa_mlx.lookahead import Lookahead
from exo_medusa_mlx.model import MedusaModel
from helpers.engines import SPLITS
from helpers.folders import save_hf_folder
from helpers.oracle import PROMPT, reference, take, take_sized
from helpers.tiny import N_LAYERS, OracleMedusa, random_heads, tiny_base

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


# --------------------------------------------------------------------------- decoding (MLX)

N = 40  # tokens each decoding test compares


def plan_for(model, n: int = 12, slope: float = 0.06, scale: float = 0.0) -> DynamicTree:
    """A dynamic plan for ``model``'s heads: cost 1 + ``slope`` per node, rates exp(scale) * p."""
    depth = model.heads.num_heads
    return make_dynamic(n, depth, model.heads.config.candidates, 1 + slope * np.maximum(np.arange(n + 1) - 1, 0),
                        Calibration((scale,) * depth, (1.0,) * depth))


def sizes_and_tokens(model, n: int = N, **kw) -> tuple[list[int], list[int]]:
    return take_sized(generate_step(PROMPT, model, **kw), n)


@pytest.fixture(scope="module")
def base():
    return tiny_base("llama")


@pytest.fixture(scope="module")
def plain(base):
    return take(generate_step(PROMPT, MedusaModel(base), tree=ROOT_ONLY), N + 8)[0]


@pytest.mark.parametrize("heads", ["medusa", "next-token"])
@pytest.mark.parametrize("window", [None, 16])
def test_dynamic_greedy_is_plain_greedy(base, plain, heads, window):
    """Random heads: the tree changes size and shape from step to step; the tokens are plain decoding's."""
    h = random_heads(3, next_token=heads == "next-token")
    model = MedusaModel(base, h)
    model = model.with_tree(plan_for(model, scale=-1.0))  # random heads are overconfident: calibrated down
    want = plain if window is None else take(generate_step(PROMPT, MedusaModel(base), tree=ROOT_ONLY,
                                                           max_kv_size=window), N)[0]
    tokens, sizes = sizes_and_tokens(model, max_kv_size=window)
    assert tokens == want[:N]
    assert len(set(sizes)) >= 2 and max(sizes) >= 3, sizes  # the size follows the heads' confidence


def test_oracle_heads_accept_deep_into_dynamic_trees(base, plain):
    future = np.concatenate([PROMPT, plain])
    model = OracleMedusa(base, random_heads(3), ROOT_ONLY, future, ranks=(0, 1))
    model.tree = plan_for(model, n=12, scale=2.0)  # the rigged heads' p ~ 0.1: calibrated up to ~0.7
    tokens, sizes = sizes_and_tokens(model)
    assert tokens == plain[:N] and N / (len(sizes) + 1) > 2.0
    assert max(sizes) > 4


@pytest.mark.parametrize("window", [None, 16])
def test_lookahead_picks_on_the_device_as_the_host_does(base, plain, window):
    """Forced on (a CPU): the device's pick of each next tree equals the host's (``Lookahead.verify``
    checks every step), at the plan's most nodes; tokens as plain decoding. A window refuses trees."""
    model = MedusaModel(base, random_heads(3))
    model = model.with_tree(plan_for(model, n=8, scale=1.5))
    if window is not None:
        with pytest.raises(ValueError, match="lookahead"):
            next(generate_step(PROMPT, model, max_kv_size=window, fast_path=True))
        return
    seen = []
    real = Lookahead.verify
    Lookahead.verify = lambda self, nxt: (seen.append(nxt.select.tolist()), real(self, nxt))[1]
    try:
        tokens, sizes = sizes_and_tokens(model, n=60, fast_path=True)
    finally:
        Lookahead.verify = real
    assert tokens == plain[:N] + take(generate_step(PROMPT, MedusaModel(base), tree=ROOT_ONLY), 60)[0][N:]
    assert set(sizes) == {8} and len({tuple(s) for s in seen}) >= 3  # fixed size, changing shape


def test_device_scores_are_calibrated_path_log_probabilities(base):
    """``propose_scored``: each superset node scores the sum along its path of
    min(0, log_scale + power * log p), p the head's softmax probability of the guess."""
    heads = random_heads(3)
    model = MedusaModel(base, heads)
    plan = make_dynamic(16, 3, heads.config.candidates, step_costs(16), Calibration((0.7, 0.3, -0.2), (1.2, 0.8, 1.0)))
    h = mx.random.normal((5, 64))
    logits, tokens, scores = (np.array(a) for a in model.propose_scored(h, plan))
    rows = np.array(model.project(h, 3))[1:].astype(np.float64)  # (3, 5, V) the heads' logits
    logp = rows - np.log(np.exp(rows).sum(-1, keepdims=True))
    order = np.argsort(-logp, axis=-1)
    for t in range(5):
        for node, path in enumerate(plan.superset.choices, start=1):
            want = sum(min(0.0, plan.calibration.log_scale[d] + plan.calibration.power[d] * logp[d, t, order[d, t, r]])
                       for d, r in enumerate(path))
            assert scores[t, node] == pytest.approx(want, abs=1e-4)
            assert tokens[t, node] == order[len(path) - 1, t, path[-1]]
        assert scores[t, 0] == 0 and tokens[t, 0] == logits[t].argmax()


def test_a_model_builds_its_plan_from_the_heads_facts(base):
    facts = {"latency_curve": {"2": 0.02, "4": 0.03}, "plain_step": 0.01,
             "calibration": {"log_scale": [0.5, 0.25, 0.0], "power": [1.0, 0.9, 1.1]}}
    model = MedusaModel(base, random_heads(3), "dynamic:6", facts=facts)
    plan = model.tree
    assert isinstance(plan, DynamicTree) and plan.size == 6 and plan.sizes == (1, 2, 3, 4, 6)
    assert plan.cost[2] == pytest.approx(2.0) and plan.cost[4] == pytest.approx(3.0)
    assert plan.calibration.log_scale == (0.5, 0.25, 0.0)
    assert isinstance(model.with_tree("cpu-4").tree.choices, tuple)
    assert MedusaModel(base, None, "dynamic").tree is ROOT_ONLY  # no heads: plain decoding
    best = MedusaModel(base, random_heads(3), "best:3", facts={"head_conditional_accuracy": [[0.6, 0.1]] * 3}).tree
    assert best.choices == ((0,), (0, 0))


def test_hydra_heads_refuse_dynamic_trees(base):
    with pytest.raises(ValueError, match="hydra heads: use a static --tree"):
        MedusaModel(base, random_heads(3, hydra=True), "dynamic:8")


# --------------------------------------------------------------------------- an exo ring


class Sizes(MedusaMLXInferenceEngine):
    """The last shard, counting the size of each tree it lays out."""

    def _load(self, *args):
        super()._load(*args)
        runner, self.sizes = self.runner, []
        emit = runner.emit

        def counted(p, h):
            logits, out = emit(p, h)
            if "medusa_next_tokens" in out:
                self.sizes.append(len(out["medusa_next_tokens"]))
            return logits, out

        runner.emit = counted


def test_dynamic_trees_across_an_exo_ring(tmp_path):
    """Three shards: each pass carries the tree the last shard picked for it (its depths and mask
    differ from pass to pass); the tokens are plain decoding's."""
    base, heads = tiny_base("llama", layers=N_LAYERS), random_heads(3)
    folder = save_hf_folder(tmp_path / "m", "llama", base, heads)
    dl = LocalShardDownloader({"m": folder})
    want = reference(MedusaModel(base, None), n=N, medusa=False)
    pairs = [(MedusaMLXInferenceEngine(dl, tree="dynamic:8"), Shard("m", a, b, N_LAYERS)) for a, b in SPLITS[3]]
    last = Sizes(dl, tree="dynamic:8")
    pairs[-1] = (last, pairs[-1][1])
    assert run_ring(pairs, PROMPT, N) == want
    assert len(set(last.sizes)) >= 2, last.sizes
