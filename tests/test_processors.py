"""Sampling controls (penalties, min-p, top-k) inside Medusa's acceptance: the same tokens and the
same distribution as plain decoding with mlx-lm's own processors and sampler.

Oracles: mlx-lm's ``make_logits_processors`` and ``make_sampler`` themselves (bit for bit,
and by sampling), mlx-lm's ``generate_step`` for greedy decoding, and the enumerated
distribution of plain sampling for the exact walk (test_sampling.py's chi-square).
"""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step as mlx_generate_step
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from exo_medusa_mlx.core.accept import target_probs
from exo_medusa_mlx.core.processors import ProcessedAcceptor, Sampling, make_sampling_policy, penalize
from exo_medusa_mlx.core.step import generate_step
from exo_medusa_mlx.core.tree import build_tree
from exo_medusa_mlx.model import MedusaModel
from test_sampling import ALPHA, N_TOKENS, PROMPT, TREES, V, CloseMedusa, chi_square, tiny_llama
from tiny import OracleMedusa, random_heads, tiny_base

PENALTIES = dict(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3)
CONTROLS = Sampling(temp=0.8, top_p=0.95, min_p=0.05, top_k=6, **PENALTIES)


def mlx_processed(logits: np.ndarray, history, s: Sampling) -> np.ndarray:
    """mlx-lm's processors over ``history`` (with exo's EOS ban first), as plain decoding applies them."""
    z = mx.array(logits[None].astype(np.float32))
    for tid in s.banned:
        z[..., tid] = -1e9
    procs = make_logits_processors(repetition_penalty=s.repetition_penalty,
                                   repetition_context_size=s.repetition_context_size,
                                   presence_penalty=s.presence_penalty, presence_context_size=s.presence_context_size,
                                   frequency_penalty=s.frequency_penalty,
                                   frequency_context_size=s.frequency_context_size)
    hist = mx.array(np.asarray(history, dtype=np.int32))
    for proc in procs:
        z = proc(hist, z)
    return np.array(z[0])


@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.5), dict(repetition_penalty=0.7, repetition_context_size=3),
                                dict(presence_penalty=0.8, presence_context_size=5), dict(frequency_penalty=0.6),
                                dict(PENALTIES, banned=(2, 9)), dict(banned=(0,))])
def test_penalize_is_mlx_lm_processors_bit_for_bit(kw):
    rng = np.random.default_rng(3)
    s = Sampling(temp=1.0, **kw)
    for _ in range(5):
        logits = (rng.normal(size=40) * 3).astype(np.float32)  # both signs: the repetition penalty's two rules
        history = rng.integers(0, 12, size=int(rng.integers(1, 30)))  # repeats, longer and shorter than contexts
        got = penalize(logits, history, s)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, mlx_processed(logits, history, s))
    np.testing.assert_array_equal(penalize(logits, [], Sampling(**PENALTIES)), logits)  # no history: unchanged


def test_sampling_refuses_bad_values_by_name():
    for bad, name in [(dict(min_p=1.5), "min_p"), (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"),
                      (dict(repetition_penalty=-1.0), "repetition_penalty"), (dict(temp=float("nan")), "temperature"),
                      (dict(presence_penalty=float("inf")), "presence_penalty"),
                      (dict(frequency_context_size=0), "frequency_context_size")]:
        with pytest.raises(ValueError, match=name):
            Sampling(**bad)


# Logits where the order of the filters matters: top-k after top-p keeps 2 of the 3 tokens top-p
# keeps; min-p then cuts one more at 0.35. Ties in row 2.
FILTER_LOGITS = np.array([[3.0, 2.6, 2.2, 1.0, 0.5, 0.0, -1.0, -2.0],
                          [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3],
                          [2.0, 2.0, 1.0, 1.0, 0.0, 0.0, -1.0, -1.0]], dtype=np.float32)


@pytest.mark.parametrize("temp,top_p,min_p,top_k", [(1.0, 0.9, 0.0, 2), (0.7, 1.0, 0.35, 0), (1.3, 0.8, 0.2, 3),
                                                    (1.0, 1.0, 0.0, 5), (0.5, 0.6, 0.05, 0)])
def test_target_probs_is_what_mlx_lm_samples(temp, top_p, min_p, top_k):
    """mlx-lm's sampler drawn 60k times per row against ``target_probs``: chi-square, and no draw outside."""
    n = 60_000
    sampler = make_sampler(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k)
    # mlx-lm's top-k keeps exactly k of tied logits (argpartition's pick), ours all of them: no ties there.
    for row in FILTER_LOGITS[:2] if top_k else FILTER_LOGITS:
        want = target_probs(row, temp, top_p, min_p, top_k)
        lp = mx.array(np.tile(row, (n, 1)))
        mx.random.seed(11)
        draws = np.array(sampler(lp - mx.logsumexp(lp, axis=-1, keepdims=True)))
        counts = np.bincount(draws, minlength=len(row))
        stat, df, p = chi_square(counts, want)
        assert p > ALPHA, f"row {row}: counts {counts}, target {np.round(want * n)} (chi2 {stat:.1f}, p {p:.1e})"


@pytest.mark.parametrize("heads", ["oracle", "random"])
def test_greedy_with_penalties_is_mlx_lm_greedy(heads):
    """Medusa greedy with penalties gives mlx-lm's plain greedy tokens with the same processors;
    heads that know the continuation accept paths, so each node's own path is penalised."""
    base, prompt, n = tiny_base("llama"), np.array([1, 5, 9, 3, 7, 2, 8, 5, 5, 4]), 40
    s = Sampling(repetition_penalty=1.4, presence_penalty=0.5, frequency_penalty=0.4, repetition_context_size=8)
    procs = make_logits_processors(repetition_penalty=1.4, repetition_context_size=8, presence_penalty=0.5,
                                   frequency_penalty=0.4)
    want = [int(t) for t, _ in itertools.islice(mlx_generate_step(mx.array(prompt), base, logits_processors=procs), n)]
    assert len(set(want)) > 8  # the penalties spread the tokens: a loop would test little
    tree = build_tree([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    if heads == "oracle":
        model = OracleMedusa(base, random_heads(3), tree, np.array(list(prompt) + want), ranks=(0, 1))
    else:
        model = MedusaModel(base, random_heads(3), tree)
    got, steps = [], 0
    for step in generate_step(prompt, model, make_sampling_policy(s, prompt)):
        got += step.tokens
        steps += step.tree_size > 0
        if len(got) >= n:
            break
    assert got[:n] == want
    if heads == "oracle":
        assert (len(got) - 1) / steps > 1.8  # paths of several tokens were accepted


def joint_processed(base, s: Sampling) -> np.ndarray:
    """P(next N_TOKENS tokens) under plain sampling with ``s``, mlx-lm's processors applied per prefix."""
    seqs = np.array(list(itertools.product(range(V), repeat=N_TOKENS - 1)), dtype=np.int64)  # (V^2, 2)
    rows = np.concatenate([np.tile(PROMPT, (len(seqs), 1)), seqs], axis=1)
    logits = np.array(base(mx.array(rows))[:, len(PROMPT) - 1:])  # (V^2, N, V)
    out = np.zeros((V,) * N_TOKENS)
    for cell in itertools.product(range(V), repeat=N_TOKENS):
        row = cell[0] * V + cell[1]  # the row whose first tokens are the cell's
        p = 1.0
        for k in range(N_TOKENS):
            z = mlx_processed(logits[row, k], list(PROMPT) + list(cell[:k]), s)
            p *= target_probs(z, s.temp, s.top_p, s.min_p, s.top_k)[cell[k]]
        out[cell] = p
    return out


class PathBlindAcceptor(ProcessedAcceptor):
    """The bug to catch: every node penalised with the committed history only, not its own path."""

    def node_logits(self, tree, tree_tokens, logits):
        return np.stack([penalize(logits[k], self.history, self.sampling) for k in range(tree.size)])


def counts_of(model, acceptor_for, n_seeds: int, seed0: int) -> np.ndarray:
    from exo_medusa_mlx.core.accept import Policy

    counts = np.zeros((V,) * N_TOKENS, dtype=np.int64)
    for seed in range(seed0, seed0 + n_seeds):
        out = []
        for step in generate_step(PROMPT, model, Policy(acceptor_for(seed), True)):
            out += step.tokens
            if len(out) >= N_TOKENS:
                break
        counts[tuple(out[:N_TOKENS])] += 1
    return counts


@pytest.fixture(scope="module")
def processed_case():
    base = tiny_llama()
    return base, joint_processed(base, CONTROLS), CloseMedusa(base, build_tree(TREES["chain"]))


def test_exact_sampling_with_controls_is_plain_sampling(processed_case):
    base, reference, model = processed_case
    counts = counts_of(model, lambda seed: ProcessedAcceptor(CONTROLS, list(PROMPT), np.random.default_rng(seed)),
                       2000, 50_000)
    stat, df, p = chi_square(counts, reference)
    assert p > ALPHA, f"chi2 {stat:.1f} on {df} df, p {p:.2e}"


def test_path_blind_penalties_fail_the_same_test(processed_case):
    base, reference, model = processed_case
    counts = counts_of(model, lambda seed: PathBlindAcceptor(CONTROLS, list(PROMPT), np.random.default_rng(seed)),
                       1000, 60_000)
    stat, df, p = chi_square(counts, reference)
    assert p < ALPHA, f"path-blind penalties passed: chi2 {stat:.1f} on {df} df, p {p:.2e}"


def test_logprobs_are_the_processed_log_softmax_of_each_emitted_token():
    base, prompt = tiny_base("llama"), np.array([1, 5, 9, 3, 7])
    s = Sampling(temp=0.9, min_p=0.05, **PENALTIES)
    policy = make_sampling_policy(s, prompt, seed=4, logprobs=True)
    acc = policy.accept
    model = MedusaModel(base, random_heads(3), build_tree([[0], [0, 0]]))
    history = [int(t) for t in prompt]
    for step in itertools.islice(generate_step(prompt, model, policy), 6):
        assert acc.logprobs.shape == (len(step.tokens), base.args.vocab_size)
        for row, tok in zip(acc.logprobs, step.tokens):
            logits = np.array(base(mx.array([history]))[0, -1])
            lp = mx.array(mlx_processed(logits, history, s))
            np.testing.assert_allclose(row, np.array(lp - mx.logsumexp(lp)), atol=1e-4)
            history.append(tok)
