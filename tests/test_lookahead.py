"""MLX's fast path (``lookahead.py``), verifying one step ahead of the host: step by step it gives the
plain ``Verifier``'s verdicts and next trees (holes and their compaction included), decoding through it
stays lossless with a small cache, it refuses a tree the host laid out differently, and it is used
only where it is exact (greedy acceptance; for trees an unbounded cache)."""

import numpy as np
import pytest

from exo_medusa_mlx import lookahead
from exo_medusa_mlx.cache import CacheContext
from exo_medusa_mlx.core.accept import make_policy
from exo_medusa_mlx.core.step import ROOT_ONLY, Sequence, Verifier, advance, prefill, start
from exo_medusa_mlx.core.tree import build_tree, tree_choices
from exo_medusa_mlx.lookahead import Lookahead, usable
from exo_medusa_mlx.model import MedusaModel
from helpers.oracle import PROMPT, decode
from helpers.tiny import CONFIGS, OracleMedusa, mlx_lm_greedy, random_heads, tiny_base


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request):
    base = tiny_base(request.param)
    return request.param, base, mlx_lm_greedy(base, 40)


def first(model, tree, policy):
    """The prefilled cache and the sequence ready for its first step over ``tree``."""
    ctx, caches = model.make_cache()
    h = prefill(model, ctx, caches, PROMPT)
    seq, _ = start(model, ctx, h, policy, tree, len(PROMPT) - 1, None)
    return ctx, caches, seq


def step_once(verifier, policy, tree, seq: Sequence):
    """One step through ``verifier`` (as ``batch_step`` runs it); ``seq`` moves on."""
    v = verifier.verify(seq)
    nxt = advance(policy, seq.tree, seq.tokens, v, root=seq.root, plan=tree)
    verifier.commit(nxt.acc.nodes)
    seq.tree, seq.tokens, seq.root = nxt.tree, nxt.tokens, nxt.root
    return v, nxt


def steps(model, tree, verifier_cls, n: int) -> list[tuple]:
    """(verdict, next trees, nodes kept) of the first n steps through ``verifier_cls``, as generate_step runs them."""
    policy = make_policy()
    ctx, caches, seq = first(model, tree, policy)
    verifier, out = verifier_cls(model, ctx, caches, tree, policy), []
    for _ in range(n):
        v, nxt = step_once(verifier, policy, tree, seq)
        out.append((v.verdict.tolist(), None if v.drafts is None else v.drafts.tolist(), nxt.acc.nodes.tolist()))
    return out


@pytest.mark.parametrize("tree", ["root", "chain-3", "cpu-8", "mc_sim_7b_63"])
def test_each_step_equals_the_plain_verifiers(tree, monkeypatch):
    """Oracle heads accept deep and commit nodes that were not contiguous in the forward; rank-0
    guesses only, so both runs rig the same rows whatever order the forwards come in."""
    monkeypatch.setattr(lookahead, "COMPACT_AT", 3)  # gather the holes away every few steps
    base = tiny_base("llama")
    future = np.concatenate([PROMPT, mlx_lm_greedy(base, 64)])
    t = ROOT_ONLY if tree == "root" else build_tree(tree_choices(tree))

    def model():
        return OracleMedusa(base, random_heads(4), t, future, ranks=(0,))

    want = steps(model(), t, Verifier, 12)
    assert steps(model(), t, Lookahead, 12) == want
    if t.size > 1:
        assert max(len(nodes) for _, _, nodes in want) > 2  # deep acceptance: out-of-place commits


def test_a_tree_other_than_the_one_queued_is_refused():
    model = MedusaModel(tiny_base("llama"), random_heads(4), build_tree(tree_choices("cpu-8")))
    policy, tree = make_policy(), model.tree
    ctx, caches, seq = first(model, tree, policy)
    la = Lookahead(model, ctx, caches, tree, policy)
    step_once(la, policy, tree, seq)
    seq.tokens = (seq.tokens + 1) % 96
    with pytest.raises(AssertionError, match="lookahead queued tree"):
        la.verify(seq)


def test_used_only_where_exact():
    greedy, sampling = make_policy(), make_policy(0.7)
    tree = build_tree(tree_choices("cpu-8"))
    assert usable(ROOT_ONLY, greedy, CacheContext(16)) and usable(tree, greedy, CacheContext())
    assert not usable(tree, greedy, CacheContext(16))  # holes cannot rotate through a window
    assert not usable(ROOT_ONLY, sampling, CacheContext()) and not usable(tree, sampling, CacheContext())
    model = MedusaModel(tiny_base("llama"), random_heads(4), tree)
    ctx, caches = model.make_cache(16)
    with pytest.raises(ValueError, match="the lookahead fast path needs greedy acceptance"):
        model.fast_verifier(ctx, caches, tree, greedy, fast_path=True)


@pytest.mark.parametrize("tree", ["chain-3", "cpu-8"])
def test_lookahead_compaction(family, tree, monkeypatch):
    """Lookahead decoding leaves rejected nodes as holes; gathering them away keeps it lossless and the cache small."""
    _, base, ref = family
    monkeypatch.setattr(lookahead, "COMPACT_AT", 3)
    model = OracleMedusa(base, random_heads(4), build_tree(tree_choices(tree)),
                         np.concatenate([PROMPT, ref]), ranks=(0, 1, 2))  # rank 1-2: a chain rejects often
    tokens, steps = decode(model, 40, fast_path=True)
    assert tokens == ref
    T = model.tree.size
    # Without compaction every forward's T slots stay; with it, at most COMPACT_AT holes
    # plus the two forwards in flight beyond the tokens committed.
    assert model.ctx.used <= len(PROMPT) + 40 + 3 + 2 * T < len(PROMPT) + steps * T
