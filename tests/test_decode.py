"""Greedy Medusa == plain greedy decoding (mlx-lm's own), on tiny random models."""

import itertools

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step as mlx_generate_step
from mlx_lm.models.cache import KVCache, RotatingKVCache

from exo_medusa_mlx import lookahead
from exo_medusa_mlx.core.step import ROOT_ONLY, generate_step
from exo_medusa_mlx.model import MedusaModel
from exo_medusa_mlx.core.tree import build_tree, tree_choices
from tiny import CONFIGS, OracleMedusa, random_heads, tiny_base

PROMPT = np.array([1, 5, 9, 3, 7, 2, 8, 11, 4])
TREES = ["chain-3", "cpu-8", "mc_sim_7b_63"]


def ours(model, n, prompt=PROMPT, medusa=True, **kw):
    out, steps = [], 0
    for s in generate_step(prompt, model, tree=None if medusa else ROOT_ONLY, **kw):
        out += s.tokens
        steps += 1
        if len(out) >= n:
            return out[:n], steps


def mlx_lm_greedy(base, n, prompt=PROMPT, max_kv_size=None):
    # Built by hand: llama's make_cache in mlx-lm 0.32 ignores max_kv_size.
    cache = [RotatingKVCache(max_size=max_kv_size, keep=4) if max_kv_size else KVCache() for _ in base.layers]
    gen = mlx_generate_step(mx.array(prompt), base, prompt_cache=cache)
    return [t for t, _ in itertools.islice(gen, n)]


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request):
    base = tiny_base(request.param)
    return request.param, base, mlx_lm_greedy(base, 40)


def test_plain_path_equals_mlx_lm(family):
    _, base, ref = family
    model = MedusaModel(base, random_heads(), build_tree([[0]]))
    assert ours(model, 40, medusa=False)[0] == ref


@pytest.mark.parametrize("tree", TREES)
def test_random_heads_lossless(family, tree):
    _, base, ref = family
    model = MedusaModel(base, random_heads(4), build_tree(tree_choices(tree)))
    assert ours(model, 40)[0] == ref


@pytest.mark.parametrize("tree", ["chain-3", "cpu-8"])
@pytest.mark.parametrize("draft", [False, True])
def test_next_token_heads_lossless(family, tree, draft):
    _, base, ref = family
    heads = random_heads(4, next_token=True)
    heads.draft_vocab = np.arange(0, 96, 3) if draft else None  # a third of the vocabulary
    model = MedusaModel(base, heads, build_tree(tree_choices(tree)))
    assert ours(model, 40)[0] == ref


@pytest.mark.parametrize("lookahead_", [False, True])
@pytest.mark.parametrize("tree", TREES)
def test_oracle_heads_lossless_and_accepting(family, tree, lookahead_):
    _, base, ref = family
    model = OracleMedusa(base, random_heads(4), build_tree(tree_choices(tree)),
                         np.concatenate([PROMPT, ref]), ranks=(0,) if tree.startswith("chain") else (0, 1))
    tokens, steps = ours(model, 40, fast_path=lookahead_)
    assert tokens == ref
    # Oracle heads: every step should accept deep into the tree.
    assert 40 / steps > 2.0


@pytest.mark.parametrize("tree", ["chain-3", "cpu-8"])
def test_lookahead_compaction(family, tree, monkeypatch):
    """Lookahead decoding leaves rejected nodes as holes; gathering them away keeps it lossless and the cache small."""
    _, base, ref = family
    monkeypatch.setattr(lookahead, "COMPACT_AT", 3)
    model = OracleMedusa(base, random_heads(4), build_tree(tree_choices(tree)),
                         np.concatenate([PROMPT, ref]), ranks=(0, 1, 2))  # rank 1-2: a chain rejects often
    tokens, steps = ours(model, 40, fast_path=True)
    assert tokens == ref
    T = model.tree.size
    # Without compaction every forward's T slots stay; with it, at most COMPACT_AT holes
    # plus the two forwards in flight beyond the tokens committed.
    assert model.ctx.used <= len(PROMPT) + 40 + 3 + 2 * T < len(PROMPT) + steps * T


@pytest.mark.parametrize("medusa", [False, True])
def test_window_equals_mlx_lm_rotating(family, medusa):
    name, base, _ = family
    W, n = 16, 64  # prompt 9 + 64 tokens through a 16-token window: several wrap-arounds
    ref = mlx_lm_greedy(base, n, max_kv_size=W)
    if medusa:
        model = OracleMedusa(base, random_heads(4), build_tree(tree_choices("cpu-8")),
                             np.concatenate([PROMPT, ref]), ranks=(0, 1, 2))
    else:
        model = MedusaModel(base, random_heads(), build_tree([[0]]))
    tokens, _ = ours(model, n, max_kv_size=W, medusa=medusa)
    assert tokens == ref


def test_window_memory_is_bounded():
    base = tiny_base("llama")
    W, n = 16, 120
    ref = mlx_lm_greedy(base, n, max_kv_size=W)
    model = OracleMedusa(base, random_heads(4), build_tree(tree_choices("cpu-8")), np.concatenate([PROMPT, ref]),
                         ranks=(0, 1))
    tokens, steps = ours(model, n, max_kv_size=W)
    assert tokens == ref and steps < n / 2  # accepting deep, through many wrap-arounds
    # The committed tokens far outnumber the window; the cache holds W - 1 of them.
    assert model.ctx.used == W - 1 and model.ctx.committed > n
