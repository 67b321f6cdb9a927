"""Dynamic trees decode losslessly wherever the step runs on MLX: ``generate_step`` (with a window, next-token
heads and a draft vocabulary), the lookahead fast path, and an exo ring; the scores the device computes are
the heads' calibrated path log-probabilities."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from exo_medusa_mlx.core.dynamic import Calibration, DynamicTree, make_dynamic, step_costs
from exo_medusa_mlx.core.step import ROOT_ONLY, generate_step
from exo_medusa_mlx.exo import MedusaMLXInferenceEngine, Shard, run_ring
from exo_medusa_mlx.lookahead import Lookahead
from exo_medusa_mlx.model import MedusaModel
from oracle import take, take_sized
from tiny import OracleMedusa, random_heads, tiny_base

PROMPT = np.array([1, 5, 9, 3, 7, 2, 8, 11, 4])
N = 40


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
    from exo_medusa_mlx.exo import LocalShardDownloader
    from test_exo_engine import N_LAYERS, SPLITS, reference, save_hf_folder, tiny_base as four_layers

    base, heads = four_layers("llama"), random_heads(3)
    folder = save_hf_folder(tmp_path / "m", "llama", base, heads)
    dl = LocalShardDownloader({"m": folder})
    want = reference(MedusaModel(base, None), n=N, medusa=False)
    pairs = [(MedusaMLXInferenceEngine(dl, tree="dynamic:8"), Shard("m", a, b, N_LAYERS)) for a, b in SPLITS[3]]
    last = Sizes(dl, tree="dynamic:8")
    pairs[-1] = (last, pairs[-1][1])
    assert run_ring(pairs, PROMPT, N) == want
    assert len(set(last.sizes)) >= 2, last.sizes
