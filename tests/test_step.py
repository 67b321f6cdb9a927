"""The Medusa step (``core/step.py``): ``generate_step`` with any heads gives plain greedy decoding's
tokens (mlx-lm's own) on tiny random models, accepting deep with heads that know the continuation;
``advance`` keeps the longest path the model agrees with (a brute force says which) and takes the next
tree from its end; ``prefill`` in chunks gives the base model's own hidden state and stops when told."""

import mlx.core as mx
import numpy as np
import pytest

from exo_medusa_mlx.core.accept import make_policy
from exo_medusa_mlx.core.limits import Cancelled
from exo_medusa_mlx.core.step import Verified, advance, generate_step, prefill
from exo_medusa_mlx.core.tree import build_tree, tree_choices
from exo_medusa_mlx.model import MedusaModel
from helpers.oracle import PROMPT, decode, root_path
from helpers.tiny import CONFIGS, VOCAB, OracleMedusa, mlx_lm_greedy, random_heads, tiny_base

TREES = ["chain-3", "cpu-8", "mc_sim_7b_63"]


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request):
    base = tiny_base(request.param)
    return request.param, base, mlx_lm_greedy(base, 40)


def test_plain_path_equals_mlx_lm(family):
    _, base, ref = family
    model = MedusaModel(base, random_heads(), build_tree([[0]]))
    assert decode(model, 40, medusa=False)[0] == ref


@pytest.mark.parametrize("tree", TREES)
def test_random_heads_lossless(family, tree):
    _, base, ref = family
    model = MedusaModel(base, random_heads(4), build_tree(tree_choices(tree)))
    assert decode(model, 40)[0] == ref


@pytest.mark.parametrize("tree", ["chain-3", "cpu-8"])
@pytest.mark.parametrize("draft", [False, True])
def test_next_token_heads_lossless(family, tree, draft):
    _, base, ref = family
    heads = random_heads(4, next_token=True)
    heads.draft_vocab = np.arange(0, 96, 3) if draft else None  # a third of the vocabulary
    model = MedusaModel(base, heads, build_tree(tree_choices(tree)))
    assert decode(model, 40)[0] == ref


@pytest.mark.parametrize("lookahead_", [False, True])
@pytest.mark.parametrize("tree", TREES)
def test_oracle_heads_lossless_and_accepting(family, tree, lookahead_):
    _, base, ref = family
    model = OracleMedusa(base, random_heads(4), build_tree(tree_choices(tree)),
                         np.concatenate([PROMPT, ref]), ranks=(0,) if tree.startswith("chain") else (0, 1))
    tokens, steps = decode(model, 40, fast_path=lookahead_)
    assert tokens == ref
    # Oracle heads: every step should accept deep into the tree.
    assert 40 / steps > 2.0


# --------------------------------------------------------------------------- advance and prefill, directly


@pytest.mark.parametrize("tree", ["chain-3", "cpu-8", "mc_sim_7b_63"])
def test_advance_keeps_the_longest_agreeing_path_and_proposes_from_its_end(tree):
    """Brute force: a node is accepted when every token on its path is the model's verdict at its
    parent; the deepest such node is kept, its verdict is the bonus token and roots the next tree."""
    t = build_tree(tree_choices(tree))
    rng = np.random.default_rng(0)
    policy = make_policy()
    deepest = set()
    for _ in range(300):
        tokens = rng.permutation(VOCAB)[: t.size]  # siblings differ, as the heads' top-k do
        # The verdict is one of a node's children (often; the first ranks most), else a token no child holds.
        verdict = np.array([int(tokens[t.children[n][min(rng.geometric(0.5) - 1, len(t.children[n]) - 1)]])
                            if t.children[n] and rng.random() < 0.85 else int(rng.integers(VOCAB, 2 * VOCAB))
                            for n in range(t.size)])
        drafts = rng.integers(0, VOCAB, (t.size, 5))
        agree = [n for n in range(t.size)
                 if all(tokens[c] == verdict[p] for p, c in zip(root_path(t, n), root_path(t, n)[1:]))]
        best = max(agree, key=lambda n: t.depths[n])  # one per depth at most: siblings differ
        acc, nxt = advance(policy, t, tokens, Verified(verdict, drafts))
        path = root_path(t, best)
        assert acc.nodes.tolist() == path
        assert acc.tokens == [int(tokens[n]) for n in path[1:]] + [int(verdict[best])]
        assert nxt.tolist() == [int(verdict[best])] + drafts[best, 1:].tolist()
        deepest.add(int(t.depths[best]))
    assert deepest == set(range(t.depth + 1))  # every depth was the answer at least once


@pytest.mark.parametrize("chunk", [1, 3, 2048])
def test_prefill_in_chunks_gives_the_base_models_own_last_state(chunk):
    base = tiny_base("qwen3")
    model = MedusaModel(base, None, build_tree([]))
    prompt = np.random.default_rng(2).integers(0, VOCAB, 11)
    ctx, caches = model.make_cache()
    h = prefill(model, ctx, caches, prompt, step=chunk)
    want = base.model(mx.array(prompt)[None])[0, -1]  # one uncached forward: mlx-lm's normed hidden states
    assert ctx.committed == len(prompt) and h.shape == want.shape
    assert float(mx.abs(h - want).max()) < 1e-4
    with pytest.raises(ValueError, match="prompt is empty"):
        prefill(model, *model.make_cache(), [])


def test_generate_step_prefill_can_be_stopped():
    model = MedusaModel(tiny_base("llama"), random_heads(4), build_tree(tree_choices("cpu-8")))
    calls = []

    def check():
        calls.append(1)
        if len(calls) > 1:
            raise Cancelled("client left")

    steps = generate_step(np.arange(5000) % 96, model, check=check)
    with pytest.raises(Cancelled, match="client left"):
        next(steps)
    assert len(calls) == 2  # before the second of three chunks of 2048
