import json

import mlx.core as mx
import numpy as np
import pytest

from exo_medusa_mlx.heads import load_heads
from exo_medusa_mlx.heads_format import MedusaConfig, write_heads
from tiny import VOCAB, random_heads, tiny_base

H = 64


def test_round_trip_shared_layout(tmp_path):
    heads = random_heads(3)
    heads.save(tmp_path)
    back = load_heads(tmp_path, H, VOCAB)
    assert back.num_heads == 3 and not back.config.own_lm_head
    h = mx.random.normal((5, H))
    lm = tiny_base().model.embed_tokens.as_linear
    assert mx.array_equal(heads.project(h, lm), back.project(h, lm))


def test_shared_projection_is_one_matmul_of_all_heads():
    heads = random_heads(2)
    base = tiny_base()
    lm = base.lm_head
    h = mx.random.normal((3, H))
    out = heads.project(h, lm)  # (1+K, 3, V)
    assert out.shape == (3, 3, VOCAB)
    assert mx.allclose(out[0], lm(h), atol=1e-6)
    assert mx.allclose(out[2], lm(heads.heads[1](h)), atol=1e-6)
    # A tree one deep reads head 0 alone: the same rows, the others never computed.
    first = heads.project(h, lm, num=1)
    assert first.shape == (2, 3, VOCAB) and mx.allclose(first, out[:2], atol=1e-6)
    assert heads.project(h, lm, base=False, num=1).shape == (1, 3, VOCAB)


def test_own_lm_head_layout_and_reference_pt(tmp_path):
    torch = pytest.importorskip("torch")
    heads = random_heads(2, own_lm_head=True, num_layers=2)
    w = heads.reference_weights()
    assert "1.2.weight" in w and "1.1.linear.bias" in w
    torch.save({k: torch.tensor(v) for k, v in w.items()}, tmp_path / "medusa_lm_head.pt")
    # Published configs lie about the head count: the keys decide.
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 5, "medusa_num_layers": 1}))
    back = load_heads(tmp_path, H, VOCAB)
    assert back.num_heads == 2 and back.config.num_layers == 2 and back.config.own_lm_head
    h = mx.random.normal((4, H))
    lm = tiny_base().lm_head
    assert mx.allclose(heads.project(h, lm), back.project(h, lm), atol=1e-6)


def _weights(num_heads=2, hidden=H):
    w = {}
    for i in range(num_heads):
        w[f"{i}.0.linear.weight"] = np.zeros((hidden, hidden), np.float32)
        w[f"{i}.0.linear.bias"] = np.zeros(hidden, np.float32)
    return w


def test_wrong_hidden_size_names_file_and_tensor(tmp_path):
    write_heads(tmp_path, _weights(hidden=32), MedusaConfig(num_heads=2, hidden_size=32, vocab_size=VOCAB))
    with pytest.raises(ValueError, match=r"medusa_lm_head.safetensors: tensor '0.0.linear.(weight|bias)' has shape \(32"):
        load_heads(tmp_path, H, VOCAB)


def test_wrong_vocab_size(tmp_path):
    w = _weights()
    w["0.1.weight"] = np.zeros((VOCAB + 1, H), np.float32)
    w["1.1.weight"] = np.zeros((VOCAB + 1, H), np.float32)
    write_heads(tmp_path, w, MedusaConfig(num_heads=2, hidden_size=H, vocab_size=VOCAB + 1))
    with pytest.raises(ValueError, match="'0.1.weight' has shape"):
        load_heads(tmp_path, H, VOCAB)


def test_missing_key(tmp_path):
    w = _weights()
    del w["1.0.linear.bias"]
    write_heads(tmp_path, w, MedusaConfig(num_heads=2, hidden_size=H, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="missing tensor '1.0.linear.bias'"):
        load_heads(tmp_path, H, VOCAB)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no medusa_lm_head"):
        load_heads(tmp_path, H, VOCAB)
    (tmp_path / "medusa_lm_head.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_heads(tmp_path, H, VOCAB)
