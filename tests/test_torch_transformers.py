"""Greedy Medusa on torch == transformers' own ``generate``; tree logits == uncached forwards."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from exo_medusa_mlx.core.heads_format import MedusaConfig  # noqa: E402
from exo_medusa_mlx.torch_compat import generate, load, stream_generate  # noqa: E402
from exo_medusa_mlx.core.step import generate_step, prefill  # noqa: E402
from exo_medusa_mlx.torch_compat.heads import MedusaHeads, load_heads  # noqa: E402
from exo_medusa_mlx.torch_compat.model import MedusaModel  # noqa: E402
from exo_medusa_mlx.core.tree import ROOT_ONLY, build_tree, tree_choices  # noqa: E402
from helpers.oracle import PROMPT, root_path, take  # noqa: E402
from helpers.torch_models import HIDDEN, VOCAB, TorchOracleMedusa, hf_greedy, tiny_pair, torch_base  # noqa: E402

FAMILIES = ["llama", "qwen2", "qwen3"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    _, tb, heads_dir = tiny_pair(request.param, root)
    return request.param, root, tb, load_heads(heads_dir, HIDDEN, VOCAB), hf_greedy(tb, PROMPT, 40)


@pytest.mark.parametrize("tree", ["cpu-8", "mc_sim_7b_63"])
def test_random_heads_equal_hf_generate(family, tree):
    _, _, tb, heads, ref = family
    model = MedusaModel(tb, heads, build_tree(tree_choices(tree)))
    assert take(generate_step(PROMPT, model), 40)[0] == ref
    assert take(generate_step(PROMPT, model, tree=ROOT_ONLY), 40)[0] == ref


def test_next_token_heads_equal_hf_generate(family):
    from exo_medusa_mlx.model import MedusaModel as MLXModel
    from helpers.tiny import random_heads, tiny_base

    name, root, tb, _, ref = family
    mlx_heads = random_heads(3, next_token=True)
    mlx_heads.draft_vocab = np.arange(1, 96, 2)
    folder = mlx_heads.save(root / "next_token_heads")
    model = MedusaModel(tb, load_heads(folder, HIDDEN, VOCAB), build_tree(tree_choices("cpu-8")))
    assert model.heads.config.next_token and model.heads.config.draft_vocab_size == 48
    assert take(generate_step(PROMPT, model), 40)[0] == ref
    # The same rows as the MLX model's (both passes, the draft's -inf included).
    mm = MLXModel(tiny_base(name), mlx_heads, model.tree)
    h = np.random.default_rng(0).normal(size=(4, HIDDEN)).astype(np.float32)
    import mlx.core as mx

    want = np.array(mm.project(mx.array(h)))
    got = model.project(torch.from_numpy(h)).numpy()
    assert (np.isneginf(got) == np.isneginf(want)).all()
    finite = np.isfinite(want)
    assert np.abs(got[finite] - want[finite]).max() < 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_oracle_heads_equal_hf_generate(family, attn):
    name, root, tb, heads, ref = family
    base = tb if attn == "sdpa" else torch_base(root / name, attn)
    model = TorchOracleMedusa(base, heads, build_tree(tree_choices("mc_sim_7b_63")),
                              np.concatenate([PROMPT, ref]), ranks=(0, 1))
    tokens, steps = take(generate_step(PROMPT, model), 40)
    assert tokens == ref
    assert 40 / steps > 2.0


def test_tree_logits_equal_uncached_forward(family):
    _, _, tb, _, _ = family
    model = MedusaModel(tb)
    buf = build_tree(tree_choices("mc_sim_7b_63"))
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=buf.size)
    ctx, caches = model.make_cache()
    prefill(model, ctx, caches, PROMPT)
    logits = model.logits(model.forward(ctx, caches, tokens, buf))
    for node in range(buf.size):
        seq = torch.from_numpy(np.concatenate([PROMPT, tokens[root_path(buf, node)]]))[None]
        with torch.inference_mode():
            want = tb(seq).logits[0, -1]  # transformers alone: no cache, its own causal mask
        assert (logits[node] - want).abs().max() < 1e-4, node


# --------------------------------------------------------------------------- the real default model


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    """The default model on torch with random heads (3, so tree cpu-8 fits)."""
    from exo_medusa_mlx.default_model import default_model_path

    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(default_model_path()))
    heads = MedusaHeads(MedusaConfig(num_heads=3, hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0.0, 0.05)
    folder = heads.save(tmp_path_factory.mktemp("heads"))
    model, tokenizer = load(heads=folder, tree="cpu-8")
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    return model, tokenizer, ids, hf_greedy(model.base, ids, 20)


def test_default_model_loads_on_cpu_float32(default):
    model, _, _, _ = default
    assert model.device.type == "cpu" and model.dtype == torch.float32
    want = build_tree(tree_choices("cpu-8"))  # the shared numpy buffers, as MLX builds them
    assert model.heads.num_heads == 3 and model.tree.choices == want.choices
    assert np.array_equal(model.tree.mask, want.mask) and np.array_equal(model.tree.tree_indices, want.tree_indices)


def test_default_model_greedy_equals_hf_generate(default):
    model, _, ids, ref = default
    assert take(generate_step(ids, model, tree=ROOT_ONLY), 20)[0] == ref
    # Heads that guess right at ranks 0-2: deep, branching acceptance on the real model.
    oracle = TorchOracleMedusa(model.base, model.heads, model.tree, np.concatenate([ids, ref]), ranks=(0, 1, 2))
    tokens, steps = take(generate_step(ids, oracle), 20)
    assert tokens == ref and steps < 12


def test_stream_generate_text_and_fields(default):
    from exo_medusa_mlx.torch_compat.generate import GenerationResponse

    model, tokenizer, ids, ref = default
    responses = list(stream_generate(model, tokenizer, ids, max_tokens=8))
    assert [r.token for r in responses] == ref[:8]
    assert "".join(r.text for r in responses) == tokenizer.decode(ref[:8])
    assert responses[-1].finish_reason == "length" and responses[-1].generation_tokens == 8
    assert responses[-1].steps >= 1 and responses[-1].mean_accepted >= 1.0
    assert generate(model, tokenizer, ids, max_tokens=8, medusa=False) == tokenizer.decode(ref[:8])
    # One response class for both backends (core/generation.py).
    from exo_medusa_mlx.generate import GenerationResponse as MlxResponse

    assert GenerationResponse is MlxResponse


def test_main_json(default, capsys):
    from exo_medusa_mlx.core.heads_format import default_heads_for
    from exo_medusa_mlx.generate import main

    main(["--backend", "torch", "--prompt", "Hi", "--max-tokens", "6", "--json", "--tree", "chain-2",
          "--device", "cpu"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["backend"] == "torch" and out["generation_tokens"] <= 6 and out["text"]
    # Medusa exactly when heads ship with the default model (loading's default).
    assert out["medusa"] is (default_heads_for(None) is not None)


def test_streaming_detokenizer_holds_split_characters(default):
    from exo_medusa_mlx.torch_compat.generate import StreamingDetokenizer

    _, tokenizer, _, _ = default
    text = "Waves 🌊 break, naïve café — 海の歌 ✓\n  end"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = StreamingDetokenizer(tokenizer)
    pieces = []
    for t in ids:
        detok.add_token(t)
        pieces.append(detok.last_segment)
        assert "\ufffd" not in pieces[-1]  # never half a character
    detok.finalize()
    pieces.append(detok.last_segment)
    assert "".join(pieces) == tokenizer.decode(ids) == text
