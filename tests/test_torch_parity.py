"""The torch twin == the MLX path: same weights, same heads, same logits and tokens."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

from exo_medusa_mlx.core.dynamic import Calibration, make_dynamic  # noqa: E402
from exo_medusa_mlx.heads import load_heads as mlx_load_heads  # noqa: E402
from exo_medusa_mlx.model import MedusaModel as MlxMedusa  # noqa: E402
from exo_medusa_mlx.core.step import generate_step, prefill  # noqa: E402
from exo_medusa_mlx.torch_compat.heads import load_heads  # noqa: E402
from exo_medusa_mlx.torch_compat.model import MedusaModel  # noqa: E402
from exo_medusa_mlx.core.tree import ROOT_ONLY, build_tree, tree_choices  # noqa: E402
from helpers.oracle import PROMPT, take  # noqa: E402
from helpers.tiny import CONFIGS, VOCAB, mlx_lm_greedy  # noqa: E402
from helpers.tiny import random_heads as mlx_random_heads  # noqa: E402
from helpers.torch_models import HIDDEN, TorchOracleMedusa, tiny_pair  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(family, MLX model, torch model) over the same weights and heads, tree cpu-8."""
    base, tb, heads_dir = tiny_pair(request.param, tmp_path_factory.mktemp(request.param))
    tree = build_tree(tree_choices("cpu-8"))
    return (request.param,
            MlxMedusa(base, mlx_load_heads(heads_dir, HIDDEN, VOCAB), tree),
            MedusaModel(tb, load_heads(heads_dir, HIDDEN, VOCAB), tree))


def test_prompt_logits_and_heads_match(pair):
    _, mm, tm = pair
    mctx, mcaches = mm.make_cache()
    h_mlx = mm.forward(mctx, mcaches, PROMPT)
    ctx, caches = tm.make_cache()
    h = tm.forward(ctx, caches, PROMPT)
    assert np.abs(h.numpy() - np.array(h_mlx)).max() < TOL
    assert np.abs(tm.logits(h).numpy() - np.array(mm.logits(h_mlx))).max() < TOL
    assert np.abs(tm.project(h[-1]).numpy() - np.array(mm.project(h_mlx[-1]))).max() < TOL


@pytest.mark.parametrize("tree,window", [("cpu-16", None), ("mc_sim_7b_63", None), ("cpu-16", 14)])
def test_tree_verify_logits_match(pair, tree, window):
    _, mm, tm = pair
    buf = build_tree(tree_choices(tree))
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=buf.size)
    prompt = np.concatenate([PROMPT, PROMPT[::-1]])  # 18 tokens: past a 14-token window
    mctx, mcaches = mm.make_cache(window)
    prefill(mm, mctx, mcaches, prompt)
    want = np.array(mm.logits(mm.forward(mctx, mcaches, tokens, buf)))
    ctx, caches = tm.make_cache(window)
    prefill(tm, ctx, caches, prompt)
    got = tm.logits(tm.forward(ctx, caches, tokens, buf)).numpy()
    assert np.array_equal(ctx.slot_pos, mctx.slot_pos)  # the shared slot map, same state
    assert np.abs(got - want).max() < TOL


@pytest.mark.parametrize("medusa,window", [(True, None), (False, None), (True, 16), (False, 16)])
def test_greedy_tokens_match_mlx(pair, medusa, window):
    """The dynamic step and the fast path's static step (run eagerly on a CPU, as CUDA graphs replay it)."""
    _, mm, tm = pair
    n = 48  # prompt 9 + 48 through a 16-token window: several wrap-arounds
    want = take(generate_step(PROMPT, mm, tree=None if medusa else ROOT_ONLY, max_kv_size=window), n)
    for fast in (False, True):
        assert take(generate_step(PROMPT, tm, tree=None if medusa else ROOT_ONLY, max_kv_size=window,
                                  fast_path=fast), n) == want, fast


@pytest.mark.parametrize("medusa", [False, True])
def test_window_equals_mlx_lm_rotating(pair, medusa):
    """Cross-backend oracle: mlx-lm's own RotatingKVCache decoding."""
    _, mm, tm = pair
    W, n = 16, 64
    ref = mlx_lm_greedy(mm.base, n, PROMPT, max_kv_size=W)
    model = tm
    if medusa:  # heads that guess right at ranks 0-2: deep, branching, non-contiguous commits
        model = TorchOracleMedusa(tm.base, tm.heads, tm.tree, np.concatenate([PROMPT, ref]), ranks=(0, 1, 2))
    steps = 0
    out = []
    for s in generate_step(PROMPT, model, tree=None if medusa else ROOT_ONLY, max_kv_size=W):
        out += s.tokens
        steps += 1
        if len(out) >= n:
            break
    assert out[:n] == ref
    if medusa:
        assert n / steps > 1.8, "oracle heads should be accepted deep into the tree"
        assert model.ctx.used == W - 1 and model.ctx.committed > 4 * W


@pytest.mark.parametrize("acceptance", ["exact", "typical"])
def test_sampling_matches_mlx_seed_for_seed(pair, acceptance):
    """The exact sampler's law on torch: the acceptors are the same numpy code, and with
    the same seed and logits equal to 1e-4 both backends draw the same tokens, so the
    torch path inherits the distribution test run on MLX (tests/test_accept.py)."""
    from exo_medusa_mlx.core.accept import make_policy

    _, mm, tm = pair
    same = 0
    for seed in range(40):
        a = take(generate_step(PROMPT, mm, make_policy(0.8, 0.9, acceptance, seed)), 12)
        b = take(generate_step(PROMPT, tm, make_policy(0.8, 0.9, acceptance, seed)), 12)
        same += a == b
    # A draw can land within 1e-4 of a boundary; beyond a rare one, any mismatch is a bug.
    assert same >= 39


def test_dynamic_tree_scores_match_mlx(tmp_path):
    """The same heads on both backends score a dynamic tree's superset alike (``propose_scored``)."""
    base, tb, _ = tiny_pair("llama", tmp_path)
    folder = mlx_random_heads(3, next_token=True).save(tmp_path / "heads")
    p = make_dynamic(16, 3, VOCAB, calibration=Calibration((0.4, 0.2, 0.0), (1.1, 0.9, 1.0)))
    h = np.random.default_rng(0).normal(size=(6, HIDDEN)).astype(np.float32)
    ours = [np.array(a) for a in MlxMedusa(base, mlx_load_heads(folder, HIDDEN, VOCAB)).propose_scored(mx.array(h), p)]
    theirs = [a.numpy() for a in MedusaModel(tb, load_heads(folder, HIDDEN, VOCAB)).propose_scored(torch.from_numpy(h), p)]
    assert np.array_equal(ours[1], theirs[1])
    np.testing.assert_allclose(ours[2], theirs[2], atol=1e-4)
