"""Head layouts in training: next-token and hydra heads, a draft vocabulary, the KL loss and the own
lm_head layout, heads started from saved ones (``helpers/training.py``'s tiny model and data)."""

import json

import mlx.core as mx
import numpy as np
import pytest

from exo_medusa_mlx.core.heads_format import MedusaConfig
from exo_medusa_mlx.training.hidden_files import iterate_batches, load_part
from exo_medusa_mlx.heads import load_heads
from exo_medusa_mlx.model import base_lm_head
from exo_medusa_mlx.training.loss import loss_fn
from exo_medusa_mlx.training.train import new_heads, train
from helpers.tiny import VOCAB
from helpers.training import K, base, cache, random_prompts, tiny_heads  # noqa: F401 (base, cache: fixtures)


def test_next_token_heads_learn_from_the_fed_token(base, cache, tmp_path):
    """--next-token: rows carry the token fed after them (the greedy one here, so the base argmax);
    plain saved heads are a starting point (zero next-token maps), and training lowers the loss."""
    from exo_medusa_mlx.training.checkpoints import init_from, saved_heads

    folder, meta = cache
    lm = base_lm_head(base)
    d = load_part(folder / meta["splits"]["train"][0]["file"], K)
    from safetensors.numpy import load_file

    raw = load_file(str(folder / meta["splits"]["train"][0]["file"]))
    np.testing.assert_array_equal(d["next"], raw["labels"][raw["left"] >= 1])  # greedy: fed == argmax

    plain = tiny_heads(base)
    plain.save(tmp_path / "plain")
    cfg = MedusaConfig(num_heads=K, hidden_size=base.args.hidden_size, vocab_size=VOCAB, next_token=True)
    heads = new_heads(cfg, None, seed=3)
    init_from(heads, *saved_heads(tmp_path / "plain", cfg))
    batch = next(iterate_batches(folder, [f["file"] for f in meta["splits"]["train"]], K, 64))
    h, t = mx.array(batch["hidden"], dtype=mx.float32), mx.array(batch["targets"])
    e = base.model.embed_tokens(mx.array(batch["next"]))
    before = float(loss_fn(heads, lm, h, t, embeds=[e])[0])
    assert before == pytest.approx(float(loss_fn(plain, lm, h, t)[0]), rel=1e-5)
    train(heads, lm, folder, meta, steps=30, batch_size=64, lr=3e-3, warmup=2, embed=base.model.embed_tokens,
          log=lambda *_: None)
    assert float(loss_fn(heads, lm, h, t, embeds=[e])[0]) < 0.8 * before
    assert float(mx.abs(heads.heads[0].next_token.weight).max()) > 0
    heads.save(tmp_path / "next")
    assert load_heads(tmp_path / "next", base.args.hidden_size, VOCAB).config.next_token
    with pytest.raises(ValueError, match="pass --next-token"):
        saved_heads(tmp_path / "next", tiny_heads(base).config)
    with pytest.raises(ValueError, match="embedding"):
        train(heads, lm, folder, meta, steps=1, batch_size=8, lr=1e-3, warmup=0, log=lambda *_: None)


def test_hydra_heads_start_from_next_token_heads_and_learn_their_path(base, cache, tmp_path):
    """--hydra: head d reads the fed token and the d tokens after it (teacher forcing); from next-token
    heads it starts exactly where they were (the root's map copied, the others zero), then learns."""
    from exo_medusa_mlx.training.checkpoints import init_from, saved_heads
    from exo_medusa_mlx.training.loss import path_embeds

    folder, meta = cache
    lm = base_lm_head(base)
    embed = base.model.embed_tokens
    nt_cfg = MedusaConfig(num_heads=K, hidden_size=base.args.hidden_size, vocab_size=VOCAB, next_token=True)
    nt = new_heads(nt_cfg, None, seed=3)
    train(nt, lm, folder, meta, steps=10, batch_size=64, lr=3e-3, warmup=2, embed=embed, log=lambda *_: None)
    nt.save(tmp_path / "next")
    cfg = MedusaConfig(num_heads=K, hidden_size=base.args.hidden_size, vocab_size=VOCAB, hydra=True)
    hydra = new_heads(cfg, None, seed=5)
    init_from(hydra, *saved_heads(tmp_path / "next", cfg))
    batch = next(iterate_batches(folder, [f["file"] for f in meta["splits"]["train"]], K, 64))
    h, t = mx.array(batch["hidden"], dtype=mx.float32), mx.array(batch["targets"])
    embeds = path_embeds(hydra, embed, batch)
    assert len(embeds) == K
    before = float(loss_fn(hydra, lm, h, t, embeds=embeds)[0])
    assert before == pytest.approx(float(loss_fn(nt, lm, h, t, embeds=embeds[:1])[0]), rel=1e-5)
    train(hydra, lm, folder, meta, steps=30, batch_size=64, lr=3e-3, warmup=2, embed=embed, log=lambda *_: None)
    assert float(loss_fn(hydra, lm, h, t, embeds=embeds)[0]) < before
    assert float(mx.abs(hydra.heads[K - 1].path[K - 1].weight).max()) > 0  # the last head reads its whole path
    hydra.save(tmp_path / "hydra")
    assert load_heads(tmp_path / "hydra", base.args.hidden_size, VOCAB).config.layout == "hydra"
    with pytest.raises(ValueError, match="pass --hydra"):
        saved_heads(tmp_path / "hydra", nt_cfg)


def test_draft_vocabulary_is_the_most_emitted_tokens(cache):
    from safetensors.numpy import load_file

    from exo_medusa_mlx.training.train import draft_vocabulary

    folder, meta = cache
    files = [f["file"] for f in meta["splits"]["train"]]
    labels = np.concatenate([load_file(str(folder / f))["labels"] for f in files])
    counts = np.bincount(labels, minlength=VOCAB)
    ids = draft_vocabulary(folder, files, 10, VOCAB)
    assert len(ids) == 10 and (np.diff(ids) > 0).all()
    assert counts[ids].min() >= np.delete(counts, ids).max()  # no left-out token is emitted more
    with pytest.raises(ValueError, match="--draft-vocab 96"):
        draft_vocabulary(folder, files, VOCAB, VOCAB)


def test_train_command_next_token_heads_with_a_draft(tmp_path):
    """``mlx_medusa train`` end to end on a tiny model folder: next-token heads from saved plain
    ones, a draft vocabulary of the most emitted tokens, both in the saved heads and config."""
    from exo_medusa_mlx.training.options import setup_arg_parser
    from exo_medusa_mlx.training.train import run
    from helpers.folders import save_hf_folder
    from helpers.tiny import N_LAYERS, tiny_base

    folder = save_hf_folder(tmp_path / "model", "llama", tiny_base("llama", layers=N_LAYERS))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([" ".join(f"t{i}" for i in p) for p in random_prompts(10, seed=4)]))
    common = ["--model", str(folder), "--prompts", str(prompts), "--max-tokens", "12", "--gen-batch-size", "4",
              "--val-split", "0.2", "--num-heads", "2", "--batch-size", "16", "--cache-dir", str(tmp_path / "cache")]
    run(setup_arg_parser().parse_args(common + ["--output", str(tmp_path / "plain"), "--iters", "3"]))
    metrics = run(setup_arg_parser().parse_args(common + [
        "--output", str(tmp_path / "next"), "--iters", "5", "--next-token", "--init-from", str(tmp_path / "plain"),
        "--draft-vocab", "20"]))
    heads = load_heads(tmp_path / "next", 64, VOCAB)
    assert heads.config.next_token and heads.config.draft_vocab_size == 20 and len(heads.draft_vocab) == 20
    info = json.loads((tmp_path / "next" / "config.json").read_text())["info"]
    assert info["draft_vocab"] == 20 and len(info["val_top1_draft"]) == 2 and info["init_from"]["layers"] == 1
    assert len(metrics["top1"]) == 2


def test_kl_loss_and_own_layout_train(base, cache, tmp_path):
    folder, meta = cache
    heads = tiny_heads(base, own=True)
    train(heads, base_lm_head(base), folder, meta, steps=3, batch_size=32, lr=1e-3, warmup=1, loss="kl",
          log=lambda *_: None)
    heads.save(tmp_path)
    loaded = load_heads(tmp_path, base.args.hidden_size, VOCAB)
    assert loaded.config.own_lm_head
    h = mx.random.normal((3, base.args.hidden_size))
    np.testing.assert_array_equal(np.array(loaded.project(h, base_lm_head(base))), np.array(heads.project(h, base_lm_head(base))))


def test_init_from_deeper_heads_start_where_the_saved_ones_were(base, cache, tmp_path):
    """--init-from: saved 1-layer heads fill the first block of 2-layer heads, the new block is
    the identity, so the logits match before training; training then moves on from there."""
    from exo_medusa_mlx.training.checkpoints import init_from, saved_heads

    folder, meta = cache
    lm = base_lm_head(base)
    saved = tiny_heads(base)
    train(saved, lm, folder, meta, steps=10, batch_size=32, lr=3e-3, warmup=1, log=lambda *_: None)
    saved.save(tmp_path / "one")
    cfg = MedusaConfig(num_heads=K, hidden_size=base.args.hidden_size, vocab_size=VOCAB, num_layers=2)
    deeper = new_heads(cfg, None, seed=5)
    init_from(deeper, *saved_heads(tmp_path / "one", cfg))
    h = mx.random.normal((6, base.args.hidden_size))
    np.testing.assert_allclose(np.array(deeper.project(h, lm)), np.array(saved.project(h, lm)), atol=1e-5)
    batch = next(iterate_batches(folder, [f["file"] for f in meta["splits"]["train"]], K, 64))
    args = [mx.array(batch["hidden"], dtype=mx.float32), mx.array(batch["targets"])]
    before = float(loss_fn(deeper, lm, *args)[0])
    train(deeper, lm, folder, meta, steps=10, batch_size=32, lr=3e-3, warmup=1, log=lambda *_: None)
    assert float(loss_fn(deeper, lm, *args)[0]) < before
    assert float(mx.abs(deeper.heads[0].blocks[1].linear.weight).max()) > 0  # the new block learned

    with pytest.raises(ValueError, match="--num-layers 2 or more"):
        deeper.save(tmp_path / "two")
        saved_heads(tmp_path / "two", tiny_heads(base).config)
    with pytest.raises(ValueError, match="--layout shared"):
        saved_heads(tmp_path / "one", tiny_heads(base, own=True).config)
