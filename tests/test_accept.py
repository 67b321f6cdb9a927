"""The acceptors (``core/accept.py``): with exact sampling Medusa's emitted tokens are distributed as
plain sampling.

A tiny llama with a 12-token vocabulary runs the step generator for three tokens
per seed, over thousands of seeds; the counts of the 12^3 sequences are compared
by a chi-square test with the distribution enumerated from the base model's own
logits (``target_probs`` of every prefix, which is what plain sampling draws
from). The seeds are fixed, so every test is deterministic; ALPHA is the chance
that a correct sampler fails a test under a fresh choice of seeds.
"""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import apply_top_p

from exo_medusa_mlx.core.accept import Acceptance, make_policy, target_probs
from exo_medusa_mlx.core.tree import build_tree
from exo_medusa_mlx.model import MedusaModel
from helpers.sampling import (ALPHA, N_CONTROL, N_SEEDS, N_TOKENS, PROMPT, TEMP, TOP_P, TREES, CloseMedusa, chi2_sf,
                              chi_square, joint, sample_counts, tiny_heads, tiny_llama)


def bonus_from_p_acceptor(temp: float, top_p: float, rng: np.random.Generator):
    """The classic bug: after rejecting the children, draw the bonus from p instead
    of the residual, which over-emits the rejected drafts."""

    def accept(tree, tree_tokens, logits) -> Acceptance:
        node, nodes, out = 0, [0], []
        while True:
            p = target_probs(logits[node], temp, top_p)
            nxt = next((c for c in tree.children[node] if rng.random() < p[int(tree_tokens[c])]), None)
            if nxt is None:
                return Acceptance(np.array(nodes), out + [int(rng.choice(len(p), p=p))])
            out.append(int(tree_tokens[nxt]))
            nodes.append(nxt)
            node = nxt

    return accept


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def reference(base):
    p = joint(base, PROMPT, N_TOKENS, TEMP, TOP_P)
    # It must not hinge on rounding: no reachable token within 1e-4 of the top-p boundary.
    for eps in (-1e-4, 1e-4):
        assert np.array_equal(p > 0, joint(base, PROMPT, N_TOKENS, TEMP, TOP_P + eps) > 0)
    return p


def test_chi2_sf_known_values():
    assert chi2_sf(10.828, 1) == pytest.approx(1e-3, rel=1e-3)
    assert chi2_sf(5.991, 2) == pytest.approx(0.05, rel=1e-3)
    assert chi2_sf(16.266, 3) == pytest.approx(1e-3, rel=1e-3)
    assert chi2_sf(149.449, 100) == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("temp", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("top_p", [0.3, 0.9, 1.0])
def test_target_probs_is_mlx_lm_sampler(temp, top_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(20, 24)) * 2
    logits[::2] = np.round(logits[::2])  # ties, also at the top-p boundary
    lp = mx.array(logits.astype(np.float32))
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    if top_p < 1.0:
        lp = apply_top_p(lp, top_p)
    want = np.array(mx.softmax(lp * (1 / temp), axis=-1))  # what mlx-lm's categorical_sampling draws from
    got = target_probs(logits, temp, top_p)
    assert np.array_equal(got > 0, want > 0)
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("tree,heads,seed0", [("chain", "random", 0), ("chain", "close", 10_000),
                                              ("branch", "random", 20_000), ("branch", "close", 30_000),
                                              ("dynamic", "close", 50_000)])
def test_exact_sampling_is_plain_sampling(base, reference, tree, heads, seed0):
    buf = TREES[tree]() if callable(TREES[tree]) else build_tree(TREES[tree])
    model = CloseMedusa(base, buf) if heads == "close" else MedusaModel(base, tiny_heads(buf.depth), buf)
    counts, per_step = sample_counts(model, lambda s: make_policy(TEMP, TOP_P, "exact", s), N_SEEDS, seed0)
    stat, df, p = chi_square(counts, reference)
    assert p > ALPHA, f"chi2 {stat:.1f} on {df} df, p {p:.2e} ({per_step:.2f} tokens per step)"
    if heads == "close":  # candidates are accepted, not only bonus tokens drawn
        assert per_step > 1.1, per_step


@pytest.mark.parametrize("acceptor", ["typical", "bonus_from_p"])
def test_inexact_acceptors_fail(base, reference, acceptor):
    # Negative controls: the same test must reject the reference's typical acceptance
    # (it keeps any candidate above a probability floor) and a subtly wrong residual.
    def policy_for(seed):
        if acceptor == "typical":
            return make_policy(TEMP, TOP_P, "typical", seed)
        return replace(make_policy(TEMP, TOP_P, "exact", seed),
                       accept=bonus_from_p_acceptor(TEMP, TOP_P, np.random.default_rng([1, seed])))

    counts, _ = sample_counts(CloseMedusa(base, build_tree(TREES["chain"])), policy_for, N_CONTROL, 40_000)
    stat, df, p = chi_square(counts, reference)
    assert p < ALPHA, f"{acceptor} passed: chi2 {stat:.1f} on {df} df, p {p:.2e}"
