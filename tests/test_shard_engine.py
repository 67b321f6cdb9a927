"""The shard engine (``engine/shard_engine.py``, MLX backend): split shards == one full shard ==
``generate_step``, on tiny random models saved as Hugging Face folders (and the real default model
for exo's own engine test); bad input refused with the engine serving on; sessions bounded; a pass
cancelled at its next layer; the end of the context decoded plainly."""

from __future__ import annotations

import asyncio
import threading

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from exo_medusa_mlx.core.accept import make_policy
from exo_medusa_mlx.core.tree import ROOT_ONLY, build_tree, tree_choices
from exo_medusa_mlx.engine import protocol as st
from exo_medusa_mlx.exo import LocalShardDownloader, MedusaMLXInferenceEngine, Shard, run_ring, run_ring_async
from exo_medusa_mlx.model import MedusaModel
from helpers.engines import SPLITS, OracleEngine, built, exo_engine_test, llama, ring, run_pass  # noqa: F401 (llama)
from helpers.oracle import N, PROMPT, reference
from helpers.tiny import CONFIGS, N_LAYERS, VOCAB, OracleMedusa


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def family(request, tmp_path_factory):
    return built(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return built("qwen3", tmp_path_factory)


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("medusa", [False, True])
def test_split_shards_equal_full_shard_and_generate_step(family, medusa):
    ref = reference(MedusaModel(family.base, family.heads, build_tree(tree_choices("cpu-8"))), medusa=medusa)
    for n_shards in SPLITS:
        pairs = ring(family.dl, family.name, n_shards)
        assert run_ring(pairs, PROMPT, N, medusa=medusa) == ref, f"{n_shards} shards"
        assert all(engine.request_ids == [] for engine, _ in pairs)  # freed on finish


@pytest.mark.parametrize("tree,ranks", [("chain-3", (0,)), ("cpu-8", (0, 1))])
def test_oracle_heads_accept_across_three_shards(family, tree, ranks):
    plain = reference(MedusaModel(family.base, None), n=N + 8, medusa=False)
    future = np.concatenate([PROMPT, plain])
    ref = reference(OracleMedusa(family.base, family.heads, build_tree(tree_choices(tree)), future, ranks=ranks))
    assert ref == plain[:N]
    pairs = ring(family.dl, family.name, 3, tree=tree)
    last = OracleEngine(family.dl, future, ranks, tree=tree)
    pairs[-1] = (last, pairs[-1][1])
    assert run_ring(pairs, PROMPT, N) == ref
    assert N / last.passes > 2.0  # several tokens per ring pass


def test_sampling_matches_generate_step(llama):
    for acceptance in ("exact", "typical"):
        ref = reference(MedusaModel(llama.base, llama.heads, build_tree(tree_choices("cpu-8"))),
                        policy=make_policy(0.8, 0.95, acceptance, seed=7))
        got = run_ring(ring(llama.dl, llama.name, 2), PROMPT, N, temp=0.8, top_p=0.95, acceptance=acceptance, seed=7)
        assert got == ref, acceptance


def test_bounded_window_across_shards(qwen3):
    W, n = 16, 40
    plain = reference(MedusaModel(qwen3.base, None), n=n + 8, medusa=False, max_kv_size=W)
    future = np.concatenate([PROMPT, plain])
    tree = "cpu-8"
    ref = reference(OracleMedusa(qwen3.base, qwen3.heads, build_tree(tree_choices(tree)), future, ranks=(0, 1, 2)),
                    n=n, max_kv_size=W)
    pairs = ring(qwen3.dl, qwen3.name, 2, tree=tree, max_kv_size=W)
    pairs[-1] = (OracleEngine(qwen3.dl, future, (0, 1, 2), tree=tree, max_kv_size=W), pairs[-1][1])
    assert run_ring(pairs, PROMPT, n) == ref == plain[:n]


def test_concurrent_requests_share_engines(llama):
    model = MedusaModel(llama.base, llama.heads, build_tree(tree_choices("cpu-8")))
    prompts = [PROMPT, PROMPT[::-1].copy(), PROMPT[:4].copy()]
    refs = [reference(model, prompt=p) for p in prompts]
    pairs = ring(llama.dl, llama.name, 2)

    async def main():
        return await asyncio.gather(*(run_ring_async(pairs, p, N, request_id=f"r{i}") for i, p in enumerate(prompts)))

    assert asyncio.run(main()) == refs


# --------------------------------------------------------------------------- exo's own engine test


def test_exo_engine_test_on_tiny_model(llama):
    e1, e2 = MedusaMLXInferenceEngine(llama.dl), MedusaMLXInferenceEngine(llama.dl)
    asyncio.run(exo_engine_test(e1, e2, llama.name, N_LAYERS, "t1 t5 t9 t3 t7"))


def test_default_model_exo_engine_test():
    """exo's own test on the real default model, split 0-14 / 15-29."""
    from exo_medusa_mlx.default_model import DEFAULT_MODEL_ID

    dl = LocalShardDownloader()
    e1, e2 = MedusaMLXInferenceEngine(dl), MedusaMLXInferenceEngine(dl)
    asyncio.run(exo_engine_test(e1, e2, DEFAULT_MODEL_ID, 30, "What is the capital of France?"))


def test_default_model_medusa_split_equals_generate_step(tmp_path):
    from exo_medusa_mlx.default_model import DEFAULT_MODEL_ID
    from exo_medusa_mlx.heads import MedusaHeads
    from exo_medusa_mlx.core.heads_format import MedusaConfig
    from exo_medusa_mlx.loading import load

    model, tokenizer = load(None)
    # Random heads as wide as the model (tiny.random_heads is 64 wide).
    heads = MedusaHeads(MedusaConfig(num_heads=3, hidden_size=model.hidden_size, vocab_size=model.vocab_size))
    mx.random.seed(3)
    heads.update(tree_map(lambda w: mx.random.normal(w.shape) * 0.05, heads.parameters()))
    heads.save(tmp_path)
    prompt = np.array(tokenizer.encode("The capital of France is"))
    ref = reference(MedusaModel(model.base, heads, build_tree(tree_choices("cpu-8"))), n=10, prompt=prompt)
    del model
    dl = LocalShardDownloader(heads={DEFAULT_MODEL_ID: tmp_path}, trees={DEFAULT_MODEL_ID: "cpu-8"})
    pairs = [(MedusaMLXInferenceEngine(dl), Shard(DEFAULT_MODEL_ID, a, b, 30)) for a, b in ((0, 14), (15, 29))]
    assert run_ring(pairs, prompt, 10, stop_on_eos=False) == ref


# --------------------------------------------------------------------------- limits and cancellation


def test_engine_pass_stops_at_the_next_layer_when_its_caller_gives_up(llama):
    engine = MedusaMLXInferenceEngine(LocalShardDownloader({"m": llama.folder}))
    shard = Shard("m", 0, N_LAYERS - 1, N_LAYERS)
    layers: list[int] = []
    started, gave_up = threading.Event(), threading.Event()
    prompt = (np.arange(300) % 96)[None]

    async def main():
        await engine.ensure_shard(shard)
        loaded = engine.runner.loaded
        done_layer = loaded.layer_done

        def held_layer(h, check):  # the first layer ends only once its caller has given up
            layers.append(1)
            started.set()
            assert gave_up.wait(30), "the caller never gave up"
            done_layer(h, check)

        loaded.layer_done = held_layer
        task = asyncio.ensure_future(engine.infer_tensor("r", shard, prompt, st.initial_state()))
        assert await asyncio.to_thread(started.wait, 30), "the pass never began"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gave_up.set()
        await engine._run(lambda: None)  # the worker is free again
        assert layers == [1] and engine.request_ids == []  # stopped after the layer it was in, its cache dropped
        loaded.layer_done = done_layer
        out, state = await engine.infer_tensor("next", shard, prompt, st.initial_state())
        return out, state

    out, state = asyncio.run(main())
    assert out.shape[1] == 300 and st.emitted_tokens(state) is not None
    engine.close()


def test_a_window_too_small_is_refused_when_the_engine_is_made():
    with pytest.raises(ValueError, match="max_kv_size 1 is too small"):
        MedusaMLXInferenceEngine(LocalShardDownloader(), max_kv_size=1)


def test_near_the_context_end_the_ring_decodes_plainly_and_exactly(llama):
    """A tree rooted near the last position would run past the context: the last shard lays out a
    plain pass there, and the tokens still equal generate_step's up to the context's end."""
    dl = LocalShardDownloader({"m": llama.folder}, trees={"m": "cpu-8"})
    prompt = (np.arange(500) * 7) % 96
    n = 512 - 500
    ref = reference(MedusaModel(llama.base, llama.heads, build_tree(tree_choices("cpu-8"))), n=n, prompt=prompt)
    pairs = [(MedusaMLXInferenceEngine(dl), Shard("m", a, b, N_LAYERS)) for a, b in [(0, 1), (2, 3)]]
    assert run_ring(pairs, prompt, n) == ref
    assert ROOT_ONLY.size == 1


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_and_the_engine_keeps_serving(llama):
    ref = reference(MedusaModel(llama.base, llama.heads, build_tree(tree_choices("cpu-8"))))
    pairs = ring(llama.dl, llama.name, 2)
    (e1, s1), (e2, s2) = pairs
    H = CONFIGS["llama"]["hidden_size"]

    def expect(msg, engine, shard, x, state=None, rid="bad"):
        with pytest.raises(ValueError, match=msg):
            asyncio.run(engine.infer_tensor(rid, shard, x, state))

    # A good request, one pass in: a tree is now pending on both shards.
    out, state = run_pass(pairs, "good", PROMPT[None], st.initial_state())
    tokens = list(st.emitted_tokens(state))
    x, nxt = st.next_request(state)
    out, state = run_pass(pairs, "good", x, nxt)
    tokens += list(st.emitted_tokens(state))
    x, nxt = st.next_request(state)

    # Wrong shape or dtype for the shard.
    expect(r"token ids of shape \(1, T\)", e1, s1, np.zeros((1, 3, H), np.float32))
    expect(r"token ids of shape \(1, T\)", e1, s1, PROMPT.astype(np.int64))
    expect(r"token ids must be in \[0, 96\)", e1, s1, np.array([[1, 96]]))
    expect(r"hidden states of shape \(1, T, 64\)", e2, s2, PROMPT[None])
    expect(r"hidden states of shape \(1, T, 64\)", e2, s2, np.zeros((1, 3, H), np.float64))
    expect(r"hidden states of shape \(1, T, 64\)", e2, s2, np.zeros((1, 3, H + 1), np.float32))
    # Unknown request id mid-generation.
    expect("unknown request id 'nope'", e1, s1, x, nxt, rid="nope")
    # Malformed inference_state.
    expect(r"\['medusa_depths'\]: expected non-empty int array", e1, s1, x, {**nxt, st.DEPTHS: nxt[st.DEPTHS] * 1.0})
    expect(r"\['medusa_tree_mask'\]: expected non-empty bool array of shape \(8, 8\)", e1, s1, x,
           {**nxt, st.TREE_MASK: nxt[st.TREE_MASK][:4, :4]})
    expect("come together", e1, s1, x, {k: v for k, v in nxt.items() if k != st.TREE_MASK})
    expect("out of sync", e1, s1, x, {**nxt, st.POSITIONS: nxt[st.POSITIONS] + 1}, rid="good")
    expect("not a root-to-node path", e1, s1, x, {**nxt, st.COMMIT: np.array([0, 7, 1])}, rid="good")
    expect("must carry inference_state", e1, s1, x, {k: v for k, v in nxt.items() if k != st.COMMIT}, rid="good")
    expect("is not one of auto", e1, s1, x, {**nxt, st.ACCEPTANCE: "best"}, rid="good")
    expect("inference_state must be a dict", e1, s1, x, ["not", "a", "dict"], rid="good")
    expect("differs from the input token ids", e1, s1, x, {**nxt, st.TOKENS: x[0] + 1}, rid="good")
    expect("needs inference_state\\['medusa_tokens'\\]", e2, s2, np.zeros((1, x.shape[1], H), np.float32),
           {**nxt}, rid="good")
    # Bad shards: outside the layer count, or not this model's.
    with pytest.raises(ValueError, match="outside its 4 layers"):
        Shard(llama.name, 0, 4, 4)
    with pytest.raises(ValueError, match="says 8 layers but the model has 4"):
        asyncio.run(MedusaMLXInferenceEngine(llama.dl).ensure_shard(Shard(llama.name, 0, 3, 8)))

    # The good request carries on to the reference's tokens; a new one runs too.
    while len(tokens) < N:
        out, state = run_pass(pairs, "good", x, nxt)
        tokens += list(st.emitted_tokens(state))
        x, nxt = st.next_request(state)
    assert tokens[:N] == ref
    assert run_ring(pairs, PROMPT, N) == ref


def test_sessions_are_bounded_lru(llama):
    pairs = ring(llama.dl, llama.name, 2, max_sessions=2)
    states = {}
    for rid in ("a", "b", "c"):
        _, state = run_pass(pairs, rid, PROMPT[None], st.initial_state())
        states[rid] = st.next_request(state)
    assert pairs[0][0].request_ids == ["b", "c"]
    with pytest.raises(ValueError, match="unknown request id 'a'"):
        run_pass(pairs, "a", *states["a"])
    run_pass(pairs, "b", *states["b"])
    assert pairs[0][0].request_ids == ["c", "b"]
    assert asyncio.run(pairs[0][0].finish_request("b")) and pairs[0][0].request_ids == ["c"]


def test_sample_and_tokenizer(llama):
    engine = MedusaMLXInferenceEngine(llama.dl)
    shard = Shard(llama.name, 0, 3, 4)
    ids = asyncio.run(engine.encode(shard, "t3 t4 t5"))
    assert ids.tolist() == [3, 4, 5]
    assert asyncio.run(engine.decode(shard, ids)).split() == ["t3", "t4", "t5"]
    logits = np.zeros((1, 2, VOCAB), np.float32)
    logits[0, -1, 17] = 5.0
    assert asyncio.run(engine.sample(logits)).tolist() == [17]
    assert asyncio.run(engine.sample(logits, temp=0.01)).shape == (1,)
