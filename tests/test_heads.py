import json

import mlx.core as mx
import numpy as np
import pytest

from exo_medusa_mlx.heads import load_heads
from exo_medusa_mlx.core.heads_format import MedusaConfig, write_heads
from exo_medusa_mlx.model import MedusaModel
from exo_medusa_mlx.core.tree import build_tree
from helpers.tiny import VOCAB, random_heads, tiny_base

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


def test_next_token_heads_read_the_base_models_next_token(tmp_path):
    heads = random_heads(2, next_token=True, num_layers=2)
    w = heads.reference_weights()
    assert "1.next_token.weight" in w and "1.next_token.bias" in w
    heads.save(tmp_path)
    back = load_heads(tmp_path, H, VOCAB)
    assert back.config.next_token and back.num_heads == 2
    base = tiny_base()
    model = MedusaModel(base, back, build_tree([[0], [0, 0]]))
    h = mx.random.normal((3, H))
    rows = model.project(h)  # (1+K, 3, V)
    lm = model.lm_head
    assert mx.allclose(rows[0], lm(h), atol=1e-6)
    # Each node's heads read the embedding of that node's own argmax.
    e = base.model.embed_tokens(mx.argmax(lm(h), axis=-1))
    assert mx.allclose(rows[1:], heads.project(h, lm, base=False, next_embeds=e), atol=1e-5)
    other = base.model.embed_tokens(mx.argmax(lm(h), axis=-1) + 1)
    assert not mx.allclose(rows[1:], heads.project(h, lm, base=False, next_embeds=other), atol=1e-3)
    assert model.project(h, depth=1).shape == (2, 3, VOCAB)
    with pytest.raises(ValueError, match="next token: pass next_embeds"):
        heads.project(h, lm)
    # Zero next-token maps (how fresh or converted heads start): plain Medusa heads.
    plain = random_heads(2, num_layers=2)
    for head, ph in zip(heads.heads, plain.heads):
        head.next_token.weight = mx.zeros_like(head.next_token.weight)
        head.next_token.bias = mx.zeros_like(head.next_token.bias)
        head.blocks = ph.blocks
    assert mx.allclose(heads.project(h, lm, next_embeds=e), plain.project(h, lm), atol=1e-6)


@pytest.mark.parametrize("next_token", [False, True])
def test_draft_vocabulary_scores_guesses_over_its_tokens_only(next_token, tmp_path):
    heads = random_heads(2, next_token=next_token)
    full = MedusaModel(tiny_base(), heads, build_tree([[0], [0, 0]]))
    ids = np.array([3, 7, 8, 20, 41, 90])
    heads.draft_vocab = ids
    heads.save(tmp_path)
    back = load_heads(tmp_path, H, VOCAB)
    np.testing.assert_array_equal(back.draft_vocab, ids)
    assert back.config.draft_vocab_size == len(ids)
    model = MedusaModel(full.base, back, full.tree)
    h = mx.random.normal((4, H))
    want, got = np.array(full.project(h)), np.array(model.project(h))
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)  # the base row is whole
    np.testing.assert_allclose(got[1:, :, ids], want[1:, :, ids], atol=1e-5)
    rest = np.setdiff1d(np.arange(VOCAB), ids)
    assert np.isneginf(got[1:, :, rest]).all()


@pytest.mark.parametrize("next_token", [False, True])
@pytest.mark.parametrize("draft", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_propose_is_the_top_k_of_project(next_token, draft, k):
    """Decoding's ``propose`` skips the heads' full rows; it must pick what ``project`` ranks first."""
    from exo_medusa_mlx.array_ops import topk_ids

    heads = random_heads(3, next_token=next_token)
    heads.draft_vocab = np.arange(1, VOCAB, 2) if draft else None
    model = MedusaModel(tiny_base(), heads, build_tree([[0], [0, 0]]))
    h = mx.random.normal((5, H))
    logits, guesses = model.propose(h, 2, k)
    rows = model.project(h, 2)
    np.testing.assert_allclose(np.array(logits), np.array(rows[0]), atol=1e-6)
    assert guesses.shape == (2, 5, k)
    np.testing.assert_array_equal(np.array(guesses), np.array(topk_ids(rows[1:], k)))


def test_rows_linear_matches_linear():
    """Verification forwards on a CPU multiply (W @ x.T).T: the same values as mlx-lm's x @ W.T."""
    import mlx.nn as nn

    from exo_medusa_mlx.model import RowsLinear

    for bias in (False, True):
        lin = nn.Linear(H, 3 * H, bias=bias)
        x = mx.random.normal((1, 4, H))
        want = lin(x)
        lin.__class__ = RowsLinear
        got = lin(x)
        assert got.shape == want.shape
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
        assert set(dict(lin.parameters())) == ({"weight", "bias"} if bias else {"weight"})


def test_rows_linear_only_in_verification_and_base_left_as_loaded(monkeypatch):
    """A tree forward on a CPU runs the layers' linears as RowsLinear and the RoPE as TreeRoPE for
    the call only: prefill and one-token forwards do not, and between calls mlx-lm's model is as loaded."""
    import mlx.nn as nn

    from exo_medusa_mlx.core.tree import build_tree
    from exo_medusa_mlx.model import MedusaModel, RowsLinear

    base = tiny_base("llama")
    ropes = [layer.self_attn.rope for layer in base.model.layers]
    model = MedusaModel(base)
    seen = []
    real = RowsLinear.__call__
    monkeypatch.setattr(RowsLinear, "__call__", lambda self, x: (seen.append(1), real(self, x))[1])
    ctx, caches = model.make_cache()
    mx.eval(model.forward(ctx, caches, [1, 2, 3]))  # a contiguous run (prefill): mlx-lm's product
    ctx.commit(caches, np.arange(3))
    assert not seen
    mx.eval(model.forward(ctx, caches, [4, 5, 6], build_tree([[0], [1]])))  # a tree: transposed, per-token RoPE
    assert seen
    for layer, rope in zip(base.model.layers, ropes):
        assert layer.self_attn.rope is rope
        assert all(type(m) is not RowsLinear for _, m in layer.named_modules())
    assert sum(type(m) is nn.Linear for _, m in base.model.layers[0].named_modules()) == 7


def test_draft_rows_of_a_quantized_lm_head():
    import mlx.nn as nn

    from exo_medusa_mlx.model import base_lm_head, lm_head_rows

    for family in ("mistral", "llama"):  # tied embedding, own lm_head
        base = tiny_base(family)
        nn.quantize(base, group_size=32, bits=8)
        ids = np.array([2, 5, 60, 95])
        idx, w = lm_head_rows(base, ids)
        h = mx.random.normal((3, H))
        np.testing.assert_allclose(np.array(h @ w.T), np.array(base_lm_head(base)(h))[:, ids], atol=1e-3)


def test_bad_draft_vocabulary(tmp_path):
    w = random_heads(2).reference_weights()
    for n, (ids, msg) in enumerate([(np.array([1, 1, 2]), "distinct"), (np.array([0, VOCAB]), "below 96")]):
        write_heads(tmp_path / str(n), dict(w, draft_vocab=ids), MedusaConfig(num_heads=2, hidden_size=H, vocab_size=VOCAB))
        with pytest.raises(ValueError, match=msg):
            load_heads(tmp_path / str(n), H, VOCAB)
    own = random_heads(2, own_lm_head=True).reference_weights()
    write_heads(tmp_path / "own", dict(own, draft_vocab=np.array([1, 2])),
                MedusaConfig(num_heads=2, hidden_size=H, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="share the base lm_head"):
        load_heads(tmp_path / "own", H, VOCAB)


def test_next_token_keys_are_checked(tmp_path):
    w = random_heads(2, next_token=True).reference_weights()
    bad = {k: v for k, v in w.items() if k != "1.next_token.bias"}
    write_heads(tmp_path / "a", bad, MedusaConfig(num_heads=2, hidden_size=H, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="missing tensor '1.next_token.bias'"):
        load_heads(tmp_path / "a", H, VOCAB)
    extra = dict(w, **{"4.next_token.weight": w["0.next_token.weight"]})
    write_heads(tmp_path / "b", extra, MedusaConfig(num_heads=2, hidden_size=H, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="'4.next_token.weight' belongs to no head"):
        load_heads(tmp_path / "b", H, VOCAB)
    wrong = dict(w, **{"0.next_token.weight": np.zeros((H, H + 1), np.float32)})
    write_heads(tmp_path / "c", wrong, MedusaConfig(num_heads=2, hidden_size=H, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="'0.next_token.weight' has shape"):
        load_heads(tmp_path / "c", H, VOCAB)


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


def test_corrupt_pt_and_config_files(tmp_path):
    torch = pytest.importorskip("torch")
    pt = tmp_path / "medusa_lm_head.pt"
    pt.write_bytes(b"garbage, not a zip or a pickle")
    with pytest.raises(ValueError, match="not a readable torch state dict"):
        load_heads(pt, H, VOCAB)
    torch.save({"0.0.linear.weight": torch.zeros(H, H), "note": 3}, pt)
    with pytest.raises(ValueError, match="not a state dict of tensors"):
        load_heads(pt, H, VOCAB)
    pt.unlink()
    write_heads(tmp_path, _weights(), MedusaConfig(num_heads=2, hidden_size=H, vocab_size=VOCAB))
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json: expected a JSON object"):
        load_heads(tmp_path, H, VOCAB)


def test_candidates_are_the_draft_else_the_vocabulary():
    assert MedusaConfig(num_heads=2, hidden_size=H, vocab_size=VOCAB).candidates == VOCAB
    assert MedusaConfig(num_heads=2, hidden_size=H, vocab_size=VOCAB, draft_vocab_size=8).candidates == 8


def test_heads_that_are_not_finite_are_never_written(tmp_path):
    heads = random_heads(2)
    weights = heads.reference_weights()
    weights["0.0.linear.weight"] = np.full_like(weights["0.0.linear.weight"], np.nan)
    with pytest.raises(ValueError, match=r"heads weights 0.0.linear.weight hold NaN or infinite values"):
        write_heads(tmp_path / "out", weights, heads.config)
    assert not (tmp_path / "out").exists()
