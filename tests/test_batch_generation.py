"""Continuous batching on MLX: every request's greedy tokens == that request decoded alone == mlx-lm's
greedy output, whatever else is in the batch and whenever it joined.

Tiny random float32 models; oracle heads (each sequence's heads know its own continuation) so
steps accept deep into the trees and commits gather nodes out of place in every row.
"""

import mlx.core as mx
import numpy as np
import pytest

from exo_medusa_mlx.cache import TreeOffset
from exo_medusa_mlx.core.accept import make_policy
from exo_medusa_mlx.core.batch_generation import BatchGenerator, batch_generate
from exo_medusa_mlx.core.generation import stream_generate
from exo_medusa_mlx.core.step import ROOT_ONLY, generate_step
from exo_medusa_mlx.core.tree import build_tree, tree_choices
from exo_medusa_mlx.model import MedusaModel
from batch_oracle import BatchOracleHeads, Tokenizer, prompts_of, run, tokens
from oracle import take
from test_decode import mlx_lm_greedy
from tiny import random_heads, tiny_base

TREES = {name: build_tree(tree_choices(name)) for name in ("cpu-8", "chain-3", "mc_sim_7b_63")}


class Oracle(BatchOracleHeads, MedusaModel):
    def context(self, caches):
        return caches[0].ctx

    def positions(self, caches, B, T):
        off = caches[0].offset  # an int, per-row offsets (B,) or per-token positions
        if isinstance(off, TreeOffset):
            return np.array(off.positions).reshape(B, T)
        return np.broadcast_to(np.array(off).reshape(-1, 1) + np.arange(T), (B, T))

    def host(self, a):
        return np.array(a)

    def project(self, h, depth=None):
        return mx.array(self.rigged(np.array(super().project(h, depth)), np.array(h)))


@pytest.fixture(scope="module")
def base():
    return tiny_base("llama")


def references(base, prompts, n, max_kv_size=None):
    return [mlx_lm_greedy(base, n, p, max_kv_size) for p in prompts]


def oracle(base, prompts, refs, tree="cpu-8", ranks=(0, 1, 2)):
    futures = {int(p[0]): np.concatenate([p, r]) for p, r in zip(prompts, refs)}
    return Oracle(base, random_heads(4), TREES[tree], futures, ranks=ranks)


def test_lengths_far_apart_equal_alone_and_mlx_lm(base):
    prompts = prompts_of([3, 57, 140, 9])
    max_tokens = [40, 12, 33, 1]
    refs = references(base, prompts, 40)
    model = oracle(base, prompts, refs)
    gen = BatchGenerator(model, Tokenizer())
    uids = gen.insert(prompts, max_tokens)
    out = run(gen, uids)
    for u, p, m, ref in zip(uids, prompts, max_tokens, refs):
        assert tokens(out[u]) == ref[:m]
        assert tokens(out[u]) == take(generate_step(p, model), m)[0]
        assert out[u][-1].finish_reason == "length" and all(r.finish_reason is None for r in out[u][:-1])
        if m > 10:
            assert out[u][-1].mean_accepted > 1.8  # accepted deep into the tree, in a batch
    assert out[uids[3]][0].finish_reason == "length" and out[uids[3]][0].steps == 0  # done at its prefill
    assert len(gen) == 0 and gen._batch.seqs == [] and gen._batch.caches[0].keys is None


def test_window_wraps_in_one_sequence_and_not_another(base):
    W = 24
    prompts = prompts_of([20, 5], seed=1)
    max_tokens = [70, 10]  # 20 + 70 tokens wrap a 24-token window several times; 5 + 10 never fill it
    refs = [mlx_lm_greedy(base, m, p, max_kv_size=W) for p, m in zip(prompts, max_tokens)]
    model = oracle(base, prompts, refs)
    gen = BatchGenerator(model, Tokenizer(), max_kv_size=W)
    uids = gen.insert(prompts, max_tokens)
    seen = []
    out = run(gen, uids, until=lambda _: seen.append([s.slots.committed for s in gen._batch.seqs]) and False)
    assert [tokens(out[u]) for u in uids] == refs
    both = [c for c in seen if len(c) == 2]
    assert max(c[1] for c in both) < W - 1 < max(c[0] for c in both)  # the long one wrapped beside the short one


@pytest.mark.parametrize("when", [1, 4])
def test_a_request_cancelled_mid_batch(base, when):
    prompts = prompts_of([7, 30, 12], seed=2)
    refs = references(base, prompts, 30)
    model = oracle(base, prompts, refs)
    gen = BatchGenerator(model, Tokenizer())
    uids = gen.insert(prompts, [30] * 3)
    out = run(gen, uids, until=lambda o: len(o[uids[1]]) >= when)
    gen.remove([uids[1]])
    cut = len(out[uids[1]])
    rest = run(gen, uids)
    assert rest[uids[1]] == [] and tokens(out[uids[1]]) == refs[1][:cut]
    for i in (0, 2):
        assert tokens(out[uids[i]] + rest[uids[i]]) == refs[i]


def test_joining_while_others_are_mid_tree(base):
    """A request with a long prompt, prefilled in chunks between the others' steps, joins while their
    next trees are laid out; another joins later still. Nothing changes for anyone."""
    prompts = prompts_of([6, 11, 150, 4], seed=3)
    refs = references(base, prompts, 36)
    model = oracle(base, prompts, refs)
    gen = BatchGenerator(model, Tokenizer(), prefill_step_size=40)
    first = gen.insert(prompts[:2], [36, 36])
    out = run(gen, first, until=lambda o: min(len(o[u]) for u in first) >= 5)
    assert all(s.tree.size > 1 for s in gen._batch.seqs)  # mid-tree: their next trees are laid out
    late = gen.insert([prompts[2]], [36])
    calls = []  # next() calls until the long prompt's first token: one chunk each, beside a step of the others
    for _ in range(10):
        calls.append(gen.next())
        if any(r.uid == late[0] for r in calls[-1]):
            break
    assert len(calls) == 4 and all({r.uid for r in rs} >= set(first) for rs in calls)
    for rs in calls:
        for r in rs:
            out.setdefault(r.uid, []).append(r)
    out2 = run(gen, until=lambda o: len(o.get(late[0], [])) >= 3)
    last = gen.insert([prompts[3]], [36])
    out3 = run(gen)
    uids = first + late + last
    got = {u: tokens(out.get(u, []) + out2.get(u, []) + out3.get(u, [])) for u in uids}
    assert [got[u] for u in uids] == refs


def test_trees_per_request_and_per_step(base):
    """Each request its own tree (root alone, a chain, a branching tree); then a scheduler's hook
    picking every sequence's next tree at random each step (padded to one shape per step)."""
    prompts = prompts_of([5, 19, 8, 33], seed=4)
    refs = references(base, prompts, 30)
    model = oracle(base, prompts, refs)
    gen = BatchGenerator(model, Tokenizer())
    trees = [ROOT_ONLY, TREES["chain-3"], TREES["cpu-8"], TREES["mc_sim_7b_63"]]
    uids = gen.insert(prompts, [30] * 4, trees=trees)
    out = run(gen, uids)
    assert [tokens(out[u]) for u in uids] == refs
    rng = np.random.default_rng(0)
    picks = []
    gen = BatchGenerator(model, Tokenizer())
    gen.tree_for = lambda B, s: picks.append(B) or trees[rng.integers(len(trees))]
    uids = gen.insert(prompts, [30] * 4)
    out = run(gen, uids)
    assert [tokens(out[u]) for u in uids] == refs
    assert max(picks) == 4 and min(picks) < 4  # called per sequence per step, with the batch's size


def test_dynamic_plans_in_a_batch(base):
    """Dynamic plans (each step's tree picked from the heads' scores at the node it extends) beside
    static trees in one batch: the rows' trees differ in size every step, padded to one shape."""
    prompts = prompts_of([6, 21, 11], seed=7)
    refs = references(base, prompts, 30)
    model = oracle(base, prompts, refs)
    gen = BatchGenerator(model, Tokenizer())
    uids = gen.insert(prompts, [30] * 3, trees=[model.plan("dynamic:8"), TREES["cpu-8"], model.plan("dynamic:16")])
    out = run(gen, uids)
    assert [tokens(out[u]) for u in uids] == refs
    assert out[uids[0]][-1].mean_accepted > 1.5  # the picked trees held the oracle's guesses


def test_plain_batched_decoding_equals_mlx_lm(base):
    prompts = prompts_of([4, 44, 17], seed=5)
    refs = references(base, prompts, 25)
    gen = BatchGenerator(MedusaModel(base, random_heads(4), TREES["cpu-8"]), Tokenizer(), medusa=False)
    uids = gen.insert(prompts, [25] * 3)
    out = run(gen, uids)
    assert [tokens(out[u]) for u in uids] == refs
    assert gen.stats.rows == gen.stats.generation_tokens  # one row and one token per request per step


def test_settings_per_request(base):
    """max_tokens, EOS, stop strings, sampling and greedy requests side by side: greedy ones still
    equal mlx-lm; a sampling one equals itself decoded alone with the same seed."""
    prompts = prompts_of([6, 13, 21, 9], seed=6)
    refs = references(base, prompts, 30)
    model = oracle(base, prompts, refs, ranks=(0,))  # the candidates a function of the prefix alone, as real heads'
    eos = refs[0][7]
    stop = f"<{refs[2][4]}><{refs[2][5]}>"
    gen = BatchGenerator(model, Tokenizer(eos))
    policies = [make_policy(), make_policy(), make_policy(), make_policy(0.8, 0.9, seed=11)]
    uids = gen.insert(prompts, [30, 6, 30, 20], policies, stops=[None, None, [stop], None])
    out = run(gen, uids)
    cut = refs[0].index(eos)
    assert tokens(out[uids[0]]) == refs[0][: cut + 1] and out[uids[0]][-1].finish_reason == "stop"
    assert tokens(out[uids[1]]) == refs[1][:6] and out[uids[1]][-1].finish_reason == "length"
    text, full = "".join(r.text for r in out[uids[2]]), "".join(f"<{t}>" for t in refs[2])
    assert out[uids[2]][-1].finish_reason == "stop" and text == full[: full.index(stop)]
    alone = take(generate_step(prompts[3], model, make_policy(0.8, 0.9, seed=11)), 20)[0]
    assert tokens(out[uids[3]]) == alone


def test_batch_generate_equals_stream_generate(base):
    prompts = prompts_of([6, 40, 3], seed=7)
    refs = references(base, prompts, 20)
    model = oracle(base, prompts, refs)
    tok = Tokenizer(eos=refs[1][9])
    res = batch_generate(model, tok, prompts, max_tokens=[20, 20, 5], return_token_ids=True)
    for p, m, text, ids, finish in zip(prompts, [20, 20, 5], res.texts, res.token_ids, res.finish_reasons):
        alone = list(stream_generate(model, tok, p, max_tokens=m))
        assert text == "".join(r.text for r in alone) and finish == alone[-1].finish_reason
        assert ids == [r.token for r in alone if r.token != tok.eos_token_id]
    assert res.stats.generation_tokens > 0 and res.stats.prompt_tokens == 49


def test_bad_requests_are_refused_before_any_is_queued(base):
    gen = BatchGenerator(MedusaModel(base, random_heads(4), TREES["cpu-8"]), Tokenizer())
    with pytest.raises(ValueError, match="max_tokens 0"):
        gen.insert([[1, 2], [3]], [5, 0])
    with pytest.raises(ValueError, match="empty"):
        gen.insert([[1, 2], []])
    with pytest.raises(ValueError, match="one per prompt"):
        gen.insert([[1, 2]], [5, 5])
    with pytest.raises(ValueError, match="context"):
        gen.insert([np.ones(600, dtype=int)])
    assert len(gen) == 0 and gen.next() == []


@pytest.mark.parametrize("layout", ["next-token with a draft vocabulary", "hydra"])
def test_every_head_layout_in_a_batch(base, layout):
    """Next-token heads (a second pass over lm_head, here a draft vocabulary's rows) and hydra heads
    (each node's children from its own path) read a batch's rows as they read one sequence's."""
    prompts = prompts_of([4, 31, 12], seed=8)
    refs = references(base, prompts, 20)
    heads = random_heads(4, next_token=True) if layout != "hydra" else random_heads(4, hydra=True)
    if layout != "hydra":
        heads.draft_vocab = np.arange(0, 96, 3)
    gen = BatchGenerator(MedusaModel(base, heads, TREES["cpu-8"]), Tokenizer())
    uids = gen.insert(prompts, [20] * 3, trees=[TREES["cpu-8"], TREES["cpu-8"], TREES["chain-3"]])
    out = run(gen, uids)
    assert [tokens(out[u]) for u in uids] == refs
