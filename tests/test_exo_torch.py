"""The torch exo engine: a torch full shard == MLX generate_step == torch generate_step, and
mixed MLX / torch rings (through the wire format) give exactly the single-node tokens."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from exo_medusa_mlx.exo import LocalShardDownloader, MedusaMLXInferenceEngine, Shard, run_ring  # noqa: E402
from exo_medusa_mlx.engine import protocol as st  # noqa: E402
from exo_medusa_mlx.engine.torch_backend import MedusaTorchInferenceEngine  # noqa: E402
from exo_medusa_mlx.model import MedusaModel  # noqa: E402
from exo_medusa_mlx.core.step import generate_step as torch_generate_step  # noqa: E402
from exo_medusa_mlx.core.tree import ROOT_ONLY, build_tree, tree_choices  # noqa: E402
from test_exo_engine import N, N_LAYERS, PROMPT, OracleEngine, built, exo_engine_test, reference  # noqa: E402
import oracle  # noqa: E402
from tiny import CONFIGS  # noqa: E402

torch.set_num_threads(1)  # tiny models; shared cores (see test_torch_tiny)

ENGINES = {"mlx": MedusaMLXInferenceEngine, "torch": MedusaTorchInferenceEngine}
SPLITS = {2: [(0, 1), (2, 3)], 3: [(0, 0), (1, 2), (3, 3)]}
MIXED = [("mlx", "torch"), ("torch", "mlx"), ("mlx", "torch", "mlx"), ("torch", "mlx", "torch")]
TREE = "cpu-8"


def mixed_ring(m, backends, **kw):
    return [(ENGINES[b](m.dl, **kw), Shard(m.name, a, e, N_LAYERS))
            for b, (a, e) in zip(backends, SPLITS[len(backends)])]


def full_torch(m, **kw):
    return [(MedusaTorchInferenceEngine(m.dl, **kw), Shard(m.name, 0, N_LAYERS - 1, N_LAYERS))]


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def family(request, tmp_path_factory):
    m = built(request.param, tmp_path_factory)
    refs = {medusa: reference(MedusaModel(m.base, m.heads, build_tree(tree_choices(TREE))), medusa=medusa)
            for medusa in (False, True)}
    return SimpleNamespace(**vars(m), refs=refs)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """For text prompts: transformers gives model type qwen2 its own tokenizer class, which drops
    the tiny word-level vocabulary (in mlx-lm's loader too)."""
    return built("llama", tmp_path_factory)


class TorchOracleEngine(oracle.OracleEngine, MedusaTorchInferenceEngine):
    """The last shard with heads that know the greedy continuation (``oracle.OracleEngine``)."""

    @staticmethod
    def back(rows, like):
        return torch.from_numpy(rows).to(like)


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("medusa", [False, True])
def test_full_torch_shard_equals_generate_step_both_backends(family, medusa):
    from exo_medusa_mlx.torch_compat.loading import load

    assert run_ring(full_torch(family), PROMPT, N, medusa=medusa) == family.refs[medusa]
    tm, _ = load(str(family.folder), heads=family.folder / "medusa", tree=TREE)
    out = []
    for s in torch_generate_step(PROMPT, tm, tree=None if medusa else ROOT_ONLY):
        out += s.tokens
        if len(out) >= N:
            break
    assert out[:N] == family.refs[medusa]


@pytest.mark.parametrize("medusa", [False, True])
@pytest.mark.parametrize("backends", MIXED, ids="-".join)
def test_mixed_rings_equal_single_node(family, backends, medusa):
    pairs = mixed_ring(family, backends)
    assert run_ring(pairs, PROMPT, N, medusa=medusa, wire=True) == family.refs[medusa]
    assert all(engine.request_ids == [] for engine, _ in pairs)  # freed on finish


@pytest.mark.parametrize("backends", [("mlx", "torch"), ("torch", "mlx")], ids="-".join)
def test_next_token_heads_through_a_mixed_ring(backends, tmp_path):
    """The last shard also needs the embedding (untied llama): the heads read the next token's."""
    from test_exo_engine import save_hf_folder, tiny_base
    from tiny import random_heads

    base, heads = tiny_base("llama"), random_heads(4, next_token=True)
    folder = save_hf_folder(tmp_path / "llama", "llama", base, heads)
    m = SimpleNamespace(name="llama", dl=LocalShardDownloader({"llama": folder}, trees={"llama": TREE}))
    want = reference(MedusaModel(base, heads, build_tree(tree_choices(TREE))))
    assert want == reference(MedusaModel(base, heads, build_tree(tree_choices(TREE))), medusa=False)
    assert run_ring(mixed_ring(m, backends), PROMPT, N, wire=True) == want


def test_oracle_heads_accept_deep_through_torch_shards(family):
    """Many tokens per pass: the torch caches commit deep, branching paths (a torch verifier, and torch
    shards under an MLX verifier)."""
    plain = reference(MedusaModel(family.base, None), n=N + 8, medusa=False)
    future = np.concatenate([PROMPT, plain])
    pairs = mixed_ring(family, ("mlx", "torch"), tree=TREE)
    last = TorchOracleEngine(family.dl, future, (0, 1), tree=TREE)
    pairs[-1] = (last, pairs[-1][1])
    assert run_ring(pairs, PROMPT, N, wire=True) == plain[:N]
    assert N / last.passes > 2.0
    pairs = mixed_ring(family, ("torch", "torch", "mlx"), tree=TREE)
    last = OracleEngine(family.dl, future, (0, 1), tree=TREE)
    pairs[-1] = (last, pairs[-1][1])
    assert run_ring(pairs, PROMPT, N, wire=True) == plain[:N]
    assert N / last.passes > 2.0


def test_bounded_window_in_a_mixed_ring(family):
    W, n = 16, 40
    ref = reference(MedusaModel(family.base, None), n=n, medusa=False, max_kv_size=W)
    pairs = mixed_ring(family, ("torch", "mlx", "torch"), tree=TREE, max_kv_size=W)
    assert run_ring(pairs, PROMPT, n, wire=True) == ref


def test_exo_engine_test_on_torch(llama):
    e1, e2 = MedusaTorchInferenceEngine(llama.dl), MedusaTorchInferenceEngine(llama.dl)
    asyncio.run(exo_engine_test(e1, e2, llama.name, N_LAYERS, "t1 t5 t9 t3 t7"))


def test_a_shard_holds_only_its_layers(family):
    engine, shard = mixed_ring(family, ("mlx", "torch"))[1]
    asyncio.run(engine.ensure_shard(shard))
    base = engine.model.base
    held = lambda m: not any(p.is_meta for p in m.parameters())  # noqa: E731
    assert [held(layer) for layer in base.model.layers] == [False, False, True, True]
    assert held(base.model.norm) and held(base.lm_head) and engine.model.heads is not None
    first, shard0 = mixed_ring(family, ("torch", "mlx"))[0]
    asyncio.run(first.ensure_shard(shard0))
    base0 = first.model.base
    assert held(base0.model.embed_tokens) and not held(base0.model.norm) and first.model.heads is None
    if not CONFIGS[family.name]["tie_word_embeddings"]:
        assert not held(base0.lm_head)


def test_checkpoint_round_trip(family, tmp_path):
    pairs = mixed_ring(family, ("torch", "torch"))
    for i, (engine, shard) in enumerate(pairs):
        asyncio.run(engine.save_checkpoint(shard, tmp_path / f"{i}.safetensors"))
    fresh = mixed_ring(family, ("torch", "torch"))
    for i, (engine, shard) in enumerate(fresh):
        asyncio.run(engine.ensure_shard(shard))
        with torch.no_grad():
            for p in engine.model.base.parameters():
                if not p.is_meta:
                    p.zero_()
        asyncio.run(engine.load_checkpoint(shard, tmp_path / f"{i}.safetensors"))
    assert run_ring(fresh, PROMPT, N, medusa=False) == family.refs[False]


def test_bad_input_is_refused_and_the_torch_engine_keeps_serving(family):
    pairs = mixed_ring(family, ("torch", "torch"))
    (e1, s1), (e2, s2) = pairs
    H = CONFIGS[family.name]["hidden_size"]
    for engine, shard, x, msg in [
        (e2, s2, np.zeros((1, 3, H + 1), np.float32), r"hidden states of shape \(1, T, 64\)"),
        (e2, s2, np.zeros((1, 3, H), np.float64), r"hidden states of shape \(1, T, 64\)"),
        (e1, s1, np.array([[1, 96]]), r"token ids must be in \[0, 96\)"),
    ]:
        with pytest.raises(ValueError, match=msg):
            asyncio.run(engine.infer_tensor("bad", shard, x, st.initial_state()))
    with pytest.raises(ValueError, match="says 8 layers but the model has 4"):
        asyncio.run(MedusaTorchInferenceEngine(family.dl).ensure_shard(Shard(family.name, 0, 3, 8)))
    assert run_ring(pairs, PROMPT, N) == family.refs[True]


def test_lazy_export_and_tokenizer(llama):
    import exo_medusa_mlx.exo as exo

    assert exo.MedusaTorchInferenceEngine is MedusaTorchInferenceEngine
    engine, shard = full_torch(llama)[0]
    ids = asyncio.run(engine.encode(shard, "t3 t4 t5"))
    assert ids.tolist() == [3, 4, 5]
    assert asyncio.run(engine.decode(shard, ids)).split() == ["t3", "t4", "t5"]
    assert engine.tokenizer.eos_token_ids == []  # the tiny configs have no EOS


# --------------------------------------------------------------------------- the real default model


def test_default_model_mixed_ring_equals_generate_step(tmp_path):
    """torch 0-9, MLX 10-19, torch 20-29 with random 576-wide heads == MLX generate_step."""
    from exo_medusa_mlx.default_model import DEFAULT_MODEL_ID
    from exo_medusa_mlx.heads import load_heads
    from exo_medusa_mlx.core.heads_format import MedusaConfig, write_heads
    from exo_medusa_mlx.loading import load

    model, tokenizer = load(None, tree=TREE)
    H, V = model.hidden_size, model.vocab_size
    rng = np.random.default_rng(3)
    weights = {}
    for i in range(3):
        weights[f"{i}.0.linear.weight"] = rng.normal(size=(H, H)).astype(np.float32) * 0.05
        weights[f"{i}.0.linear.bias"] = rng.normal(size=(H,)).astype(np.float32) * 0.05
    write_heads(tmp_path, weights, MedusaConfig(num_heads=3, hidden_size=H, vocab_size=V))
    prompt = np.array(tokenizer.encode("The capital of France is"))
    n = 12
    ref = reference(MedusaModel(model.base, load_heads(tmp_path, H, V), build_tree(tree_choices(TREE))),
                    n=n, prompt=prompt)
    del model
    dl = LocalShardDownloader(heads={DEFAULT_MODEL_ID: tmp_path}, trees={DEFAULT_MODEL_ID: TREE})
    pairs = [(ENGINES[b](dl), Shard(DEFAULT_MODEL_ID, a, e, 30))
             for b, (a, e) in zip(("torch", "mlx", "torch"), ((0, 9), (10, 19), (20, 29)))]
    assert run_ring(pairs, prompt, n, stop_on_eos=False, wire=True) == ref
