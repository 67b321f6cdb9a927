"""The exo engine: split shards == one full shard == decode.generate_step, on tiny random
models saved as Hugging Face folders (and the real default model for exo's own test)."""

from __future__ import annotations

import asyncio
import importlib
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from exo_medusa_mlx.core.accept import make_policy
from exo_medusa_mlx.core.step import ROOT_ONLY, generate_step
from exo_medusa_mlx.exo import LocalShardDownloader, MedusaMLXInferenceEngine, Shard, run_ring, run_ring_async
from exo_medusa_mlx.engine import protocol as st
from exo_medusa_mlx.model import MedusaModel
from exo_medusa_mlx.core.tree import build_tree, tree_choices
import oracle
from hostile import save_folder
from tiny import CONFIGS, VOCAB, OracleMedusa, random_heads

PROMPT = np.array([1, 5, 9, 3, 7, 2, 8, 11, 4])
N_LAYERS = 4
N = 24
SPLITS = {1: [(0, 3)], 2: [(0, 1), (2, 3)], 3: [(0, 0), (1, 2), (3, 3)]}


def tiny_base(family: str, seed: int = 0):
    """tiny.tiny_base's recipe with N_LAYERS layers, so a model splits three ways."""
    mod = importlib.import_module(f"mlx_lm.models.{ {'mistral': 'llama'}.get(family, family)}")
    mx.random.seed(seed)
    model = mod.Model(mod.ModelArgs.from_dict({**CONFIGS[family], "num_hidden_layers": N_LAYERS}))
    model.update(tree_map(lambda w: w * 2.0, model.parameters()))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def save_hf_folder(folder, family: str, base, heads=None):
    """config.json, model.safetensors, a word-level tokenizer ("t0".."t95"), heads in medusa/."""
    return save_folder(folder, {**CONFIGS[family], "num_hidden_layers": N_LAYERS}, base, heads)


def reference(model, n=N, prompt=PROMPT, medusa=True, **kw) -> list[int]:
    out = []
    for s in generate_step(prompt, model, tree=None if medusa else ROOT_ONLY, **kw):
        out += s.tokens
        if len(out) >= n:
            return out[:n]


def ring(downloader, model_id, n_shards, engine_cls=MedusaMLXInferenceEngine, **kw):
    return [(engine_cls(downloader, **kw), Shard(model_id, a, b, N_LAYERS)) for a, b in SPLITS[n_shards]]


class OracleEngine(oracle.OracleEngine, MedusaMLXInferenceEngine):
    """The last shard with heads that know the greedy continuation (``oracle.OracleEngine``)."""

    @staticmethod
    def back(rows, like):
        return mx.array(rows)


_BUILT: dict[str, SimpleNamespace] = {}


def built(name: str, tmp_path_factory) -> SimpleNamespace:
    """A tiny model of family ``name`` with random heads, saved once per session."""
    if name not in _BUILT:
        base = tiny_base(name)
        heads = random_heads(4)
        folder = save_hf_folder(tmp_path_factory.mktemp(name), name, base, heads)
        dl = LocalShardDownloader({name: folder}, trees={name: "cpu-8"})
        _BUILT[name] = SimpleNamespace(name=name, base=base, heads=heads, dl=dl, folder=folder)
    return _BUILT[name]


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def family(request, tmp_path_factory):
    return built(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return built("llama", tmp_path_factory)


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


async def exo_engine_test(engine1, engine2, model_id: str, n_layers: int, prompt: str):
    """Full shard vs two split shards: equal outputs for the prompt and the next step, two request ids."""
    full = Shard(model_id, 0, n_layers - 1, n_layers)
    pp = n_layers // 2 - 1
    first, second = Shard(model_id, 0, pp, n_layers), Shard(model_id, pp + 1, n_layers - 1, n_layers)

    resp_full, state_full = await engine1.infer_prompt("A", full, prompt)
    token_full = (await engine1.sample(resp_full)).reshape(1, -1)
    next_full, _ = await engine1.infer_tensor("A", full, token_full, state_full)

    resp1, state1 = await engine1.infer_prompt("B", first, prompt)
    resp2, state2 = await engine2.infer_tensor("B", second, resp1, state1)
    token2 = (await engine2.sample(resp2)).reshape(1, -1)
    resp3, state3 = await engine1.infer_tensor("B", first, token2, state2)
    resp4, _ = await engine2.infer_tensor("B", second, resp3, state3)

    assert resp_full.shape[:2] == (1, len(await engine1.encode(full, prompt)))
    assert np.array_equal(resp_full, resp2)
    assert np.array_equal(next_full, resp4)
    assert np.array_equal(token_full, token2)


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


# --------------------------------------------------------------------------- bad input


def _pass(pairs, rid, x, state):
    async def go(x, state):
        for engine, shard in pairs:
            x, state = await engine.infer_tensor(rid, shard, x, state)
        return x, state

    return asyncio.run(go(x, state))


def test_bad_input_is_refused_and_the_engine_keeps_serving(llama):
    ref = reference(MedusaModel(llama.base, llama.heads, build_tree(tree_choices("cpu-8"))))
    pairs = ring(llama.dl, llama.name, 2)
    (e1, s1), (e2, s2) = pairs
    H = CONFIGS["llama"]["hidden_size"]

    def expect(msg, engine, shard, x, state=None, rid="bad"):
        with pytest.raises(ValueError, match=msg):
            asyncio.run(engine.infer_tensor(rid, shard, x, state))

    # A good request, one pass in: a tree is now pending on both shards.
    out, state = _pass(pairs, "good", PROMPT[None], st.initial_state())
    tokens = list(st.emitted_tokens(state))
    x, nxt = st.next_request(state)
    out, state = _pass(pairs, "good", x, nxt)
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
        out, state = _pass(pairs, "good", x, nxt)
        tokens += list(st.emitted_tokens(state))
        x, nxt = st.next_request(state)
    assert tokens[:N] == ref
    assert run_ring(pairs, PROMPT, N) == ref


def test_sessions_are_bounded_lru(llama):
    pairs = ring(llama.dl, llama.name, 2, max_sessions=2)
    states = {}
    for rid in ("a", "b", "c"):
        _, state = _pass(pairs, rid, PROMPT[None], st.initial_state())
        states[rid] = st.next_request(state)
    assert pairs[0][0].request_ids == ["b", "c"]
    with pytest.raises(ValueError, match="unknown request id 'a'"):
        _pass(pairs, "a", *states["a"])
    _pass(pairs, "b", *states["b"])
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
