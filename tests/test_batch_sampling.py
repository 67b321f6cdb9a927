"""Exact sampling per sequence in a mixed batch: each request's tokens are distributed as plain sampling.

The chi-square test of tests/test_sampling.py (the joint distribution of the first three
tokens after ``PROMPT``, enumerated from the base model), with every sample drawn inside a
batch: beside it, requests with other prompts and lengths, greedy and sampling, other
trees, some joining after the batch has started. Each sampled request also equals itself
decoded alone with the same seed.
"""

import numpy as np
import pytest

from exo_medusa_mlx.core.accept import make_policy
from exo_medusa_mlx.core.batch_generation import BatchGenerator
from exo_medusa_mlx.core.step import generate_step
from exo_medusa_mlx.core.tree import build_tree
from exo_medusa_mlx.model import MedusaModel
from batch_oracle import Tokenizer, run, tokens
from oracle import take
from test_sampling import ALPHA, N_TOKENS, PROMPT, TEMP, TOP_P, TREES, chi_square, joint, tiny_heads, tiny_llama

N_SAMPLES = 2000
PER_BATCH = 4  # PROMPT's requests per batch (two at the start, two joining after the first step)


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def sample_batches(model, n_samples: int, seed0: int) -> tuple[np.ndarray, list[tuple[int, list[int]]]]:
    """Counts of PROMPT's first three tokens over ``n_samples`` requests, and (seed, tokens) of each."""
    counts = np.zeros((model.vocab_size,) * N_TOKENS, dtype=np.int64)
    drawn = []
    branch, chain = build_tree(TREES["branch"]), build_tree(TREES["chain"])
    for k in range(n_samples // PER_BATCH):
        seeds = [seed0 + PER_BATCH * k + i for i in range(PER_BATCH)]
        gen = BatchGenerator(model, Tokenizer())
        # Beside them: a greedy request with a longer prompt, a sampling one with another tree.
        other = gen.insert([[5, 2, 9, 9, 1, 0, 4, 7, 3], [8, 8]], [8, 6],
                           [make_policy(), make_policy(TEMP, TOP_P, "exact", seed=k)], trees=[chain, branch])
        ours = gen.insert([PROMPT] * 2, [N_TOKENS] * 2, [make_policy(TEMP, TOP_P, "exact", s) for s in seeds[:2]])
        out = run(gen, until=lambda o: True)  # one step, then two more join
        ours += gen.insert([PROMPT] * 2, [N_TOKENS] * 2, [make_policy(TEMP, TOP_P, "exact", s) for s in seeds[2:]])
        for u, rs in run(gen).items():
            out.setdefault(u, []).extend(rs)
        assert all(len(out[u]) == n for u, n in zip(other, (8, 6)))
        for s, u in zip(seeds, ours):
            toks = tokens(out[u])
            counts[tuple(toks)] += 1
            drawn.append((s, toks))
    return counts, drawn


def test_exact_sampling_per_sequence_in_a_mixed_batch(base):
    model = MedusaModel(base, tiny_heads(2), build_tree(TREES["branch"]))
    counts, drawn = sample_batches(model, N_SAMPLES, 50_000)
    stat, df, p = chi_square(counts, joint(base, PROMPT, N_TOKENS, TEMP, TOP_P))
    assert p > ALPHA, f"chi2 {stat:.1f} on {df} df, p {p:.2e}"
    for s, toks in drawn[:40]:  # and each is the request decoded alone with its seed
        assert toks == take(generate_step(PROMPT, model, make_policy(TEMP, TOP_P, "exact", s)), N_TOKENS)[0]
