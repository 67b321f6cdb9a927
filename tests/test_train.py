"""Training Medusa heads on tiny random models: data, loss, checkpoints, resume."""

import itertools
import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step as mlx_generate_step

from exo_medusa_mlx.heads import load_heads
from exo_medusa_mlx.core.heads_format import MedusaConfig
from exo_medusa_mlx.model import base_lm_head
from exo_medusa_mlx.training.distill import self_distill
from exo_medusa_mlx.training.state_cache import build_cache
from exo_medusa_mlx.training.hidden_files import iterate_batches, load_part
from exo_medusa_mlx.training.loss import loss_fn, ranks_and_logprobs, target_ranks
from exo_medusa_mlx.training.prompts import read_documents, read_prompts
from exo_medusa_mlx.training.train import new_heads, train
from helpers.tiny import VOCAB, random_heads, tiny_base
from helpers.training import EOS, K, base, cache, random_prompts, tiny_heads  # noqa: F401 (base, cache: fixtures)


def test_self_distill_equals_plain_greedy(base):
    """The continuous batch (filter, extend) gives each prompt what mlx-lm's unbatched greedy gives."""
    prompts = random_prompts(7, seed=1)
    got = {i: row for i, row in self_distill(base, base_lm_head(base), prompts, {EOS}, 25, batch_size=4)}
    assert sorted(got) == list(range(7))
    for i, p in enumerate(prompts):
        ref = [t for t, _ in itertools.islice(mlx_generate_step(mx.array(p), base), 25)]
        ref = ref[: ref.index(EOS) + 1] if EOS in ref else ref
        assert got[i].labels == ref, i
        assert len(got[i].hidden) == len(ref)
    # the first row is the last prompt position: its hidden state is the unbatched one
    h = base.model(mx.array(prompts[0])[None])[0, -1]
    np.testing.assert_allclose(got[0].hidden[0], np.array(h), atol=1e-4)



def test_samples_per_prompt(base, tmp_path):
    """Several responses per prompt: the first greedy (mlx-lm's), the others sampled;
    the val split takes whole prompts, so no val prompt is trained on."""
    prompts = random_prompts(8, seed=2)
    lm = base_lm_head(base)
    got = dict(self_distill(base, lm, prompts * 2, set(), 12, batch_size=5, temp=1.0, greedy=set(range(8))))
    for i, p in enumerate(prompts):
        assert got[i].labels == [t for t, _ in itertools.islice(mlx_generate_step(mx.array(p), base), 12)], i
    assert any(got[i + 8].labels != got[i].labels for i in range(8))  # sampled: another path
    for i, p in enumerate(prompts):
        assert got[i].nexts == got[i].labels  # greedy: the fed token is the argmax
        r = got[i + 8]  # sampled: the rows are the base model's states along the fed tokens
        ref = mx.argmax(lm(base.model(mx.array(p + r.nexts[:-1])[None])), axis=-1)[0, len(p) - 1 :]
        assert np.array(ref).tolist() == r.labels, i
    assert any(got[i + 8].nexts != got[i + 8].labels for i in range(8))
    meta = build_cache(tmp_path / "c", base, lm, key="s", prompts=prompts, eos=set(), val_split=0.25,
                       max_tokens=10, batch_size=5, temp=1.0, samples=3)
    assert meta["sequences"] == {"train": 18, "val": 6}
    assert "3 responses each" in meta["data"]
    with pytest.raises(ValueError, match="temperature"):
        build_cache(tmp_path / "d", base, lm, key="t", prompts=prompts, samples=2, temp=0.0)


def test_parts_hold_targets_at_offset_two(cache):
    folder, meta = cache
    assert meta["rows"]["train"] > 0 and meta["rows"]["val"] > 0
    assert meta["sequences"]["val"] == round(0.2 * 24)
    from safetensors.numpy import load_file

    raw = load_file(str(folder / meta["splits"]["train"][0]["file"]))
    d = load_part(folder / meta["splits"]["train"][0]["file"], K)
    labels, left = raw["labels"], raw["left"]
    rows = np.flatnonzero(left >= 1)
    assert len(d["targets"]) == len(rows)
    for j, r in enumerate(rows[:50]):
        for i in range(K):  # head i at t predicts token t+2+i = the base argmax at t+1+i
            assert d["targets"][j, i] == (labels[r + 1 + i] if left[r] >= i + 1 else -1)
    valid = d["targets"] >= 0
    assert (d["teacher_ids"] == d["targets"][..., None]).any(-1)[valid].all()  # the argmax is in the top-k
    assert (d["teacher_probs"].sum(-1)[valid] <= 1.0 + 1e-3).all()


def test_ranks_and_logprobs():
    heads, model = random_heads(3), tiny_base()
    h = mx.random.normal((7, 64))
    targets = mx.array(np.random.default_rng(0).integers(-1, 96, (7, 3)))
    ranks, logp = (np.array(a) for a in ranks_and_logprobs(heads, model.lm_head, h, targets, k=5))
    assert np.array_equal(ranks, np.array(target_ranks(heads, model.lm_head, h, targets)))
    assert logp.shape == (7, 3, 5) and (np.diff(logp, axis=-1) <= 0).all() and (logp <= 0).all()
    full = np.array(heads.project(h, model.lm_head, base=False))  # (3, 7, V)
    want = -np.sort(-(full - np.log(np.exp(full).sum(-1, keepdims=True))), axis=-1)[..., :5]
    np.testing.assert_allclose(logp, want.transpose(1, 0, 2), atol=1e-5)


def test_training_lowers_loss_and_heads_round_trip(base, cache, tmp_path):
    folder, meta = cache
    heads = tiny_heads(base)
    lm = base_lm_head(base)
    batch = next(iterate_batches(folder, [f["file"] for f in meta["splits"]["train"]], K, 64))
    args = [mx.array(batch["hidden"], dtype=mx.float32), mx.array(batch["targets"])]
    before = float(loss_fn(heads, lm, *args)[0])
    metrics = train(heads, lm, folder, meta, steps=30, batch_size=64, lr=3e-3, warmup=2, log=lambda *_: None)
    after = float(loss_fn(heads, lm, *args)[0])
    assert after < 0.8 * before, (before, after)
    assert len(metrics["top1"]) == K and 0.0 <= metrics["top1"][0] <= metrics["top5"][0] <= 1.0

    heads.save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["medusa_num_heads"] == K
    loaded = load_heads(tmp_path, base.args.hidden_size, VOCAB)
    h = mx.random.normal((5, base.args.hidden_size))
    np.testing.assert_array_equal(np.array(loaded.project(h, lm)), np.array(heads.project(h, lm)))


def test_training_stops_when_the_loss_is_not_finite(base, cache, tmp_path):
    folder, meta = cache
    heads = tiny_heads(base)
    block = heads.heads[1].blocks[0].linear
    block.weight = block.weight.at[0, 0].add(mx.array(float("inf")))  # a head that has diverged
    with pytest.raises(ValueError, match="training diverged: the loss is (nan|inf) at step 0"):
        train(heads, base_lm_head(base), folder, meta, steps=20, batch_size=16, lr=1e-3, warmup=0,
              checkpoint=tmp_path / "checkpoint", save_every=1, log=lambda *_: None)
    assert not (tmp_path / "checkpoint").exists()  # nothing non-finite was saved


def test_resume_equals_uninterrupted(base, cache, tmp_path, monkeypatch):
    import exo_medusa_mlx.training.train as T

    folder, meta = cache
    lm = base_lm_head(base)
    kw = dict(steps=8, batch_size=32, lr=2e-3, warmup=2, log=lambda *_: None)
    straight = tiny_heads(base)
    train(straight, lm, folder, meta, **kw)

    # The same run, interrupted right after the checkpoint at step 5 ...
    class Stop(Exception):
        pass

    real = T.save_checkpoint

    def save_then_stop(*args):
        real(*args)
        raise Stop

    ck = tmp_path / "ck"
    monkeypatch.setattr(T, "save_checkpoint", save_then_stop)
    with pytest.raises(Stop):
        train(tiny_heads(base), lm, folder, meta, **kw, checkpoint=ck, save_every=5)
    monkeypatch.setattr(T, "save_checkpoint", real)
    assert json.loads((ck / "state.json").read_text())["step"] == 5
    # ... and resumed from heads initialised differently: everything must come from the checkpoint.
    resumed = tiny_heads(base, seed=123)
    train(resumed, lm, folder, meta, **kw, checkpoint=ck, resume=True, save_every=100)
    for (k, a), (_, b) in zip(sorted(straight.reference_weights().items()), sorted(resumed.reference_weights().items())):
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg=k)


def test_relabel_uses_base_predictions(base, tmp_path):
    lm = base_lm_head(base)
    rng = np.random.default_rng(2)
    docs = [(rng.integers(4, VOCAB, n).tolist(), 0) for n in (9, 5, 14, 7)]
    meta = build_cache(tmp_path, base, lm, key="d", docs=docs, batch_size=3)
    assert meta["sequences"]["train"] == 4
    from safetensors.numpy import load_file

    raw = load_file(str(tmp_path / meta["splits"]["train"][0]["file"]))
    start = 0
    for ids, _ in sorted(docs, key=lambda d: len(d[0])):  # written shortest first
        n = len(ids)
        ref = np.array(mx.argmax(lm(base.model(mx.array(ids)[None])), axis=-1)[0])
        np.testing.assert_array_equal(raw["labels"][start : start + n], ref)
        np.testing.assert_array_equal(raw["left"][start : start + n], np.arange(n)[::-1])
        np.testing.assert_array_equal(raw["next_tokens"][start : start + n - 1], ids[1:])  # the text's next token
        start += n

    # Another key over a finished cache is refused, and the cache is left whole; a folder
    # without meta.json (an interrupted run) is cleared and rebuilt.
    files = sorted(f.name for f in tmp_path.iterdir())
    with pytest.raises(ValueError, match="other data.*--cache-dir"):
        build_cache(tmp_path, base, lm, key="other", docs=docs[:2], batch_size=3)
    assert sorted(f.name for f in tmp_path.iterdir()) == files
    assert build_cache(tmp_path, base, lm, key="d", docs=docs, batch_size=3) == meta
    (tmp_path / "meta.json").unlink()
    again = build_cache(tmp_path, base, lm, key="other", docs=docs[:2], batch_size=3)
    assert again["sequences"]["train"] == 2 and len(list(tmp_path.glob("*.safetensors"))) == len(again["splits"]["train"])


def test_data_files_and_errors(tmp_path):
    from exo_medusa_mlx.training.prompts import DEFAULT_PROMPTS

    p = read_prompts(DEFAULT_PROMPTS)
    assert len(p) >= 300 and len(set(p)) == len(p)
    bad = tmp_path / "bad.json"
    bad.write_text('{"x": 1}')
    with pytest.raises(ValueError, match="list of strings"):
        read_prompts(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_prompts(tmp_path / "missing.json")

    class Tok:
        chat_template = None

        def encode(self, s, add_special_tokens=True):
            return [ord(c) % 90 + 4 for c in s]

    j = tmp_path / "d.jsonl"
    j.write_text(json.dumps({"text": "hello there world"}) + "\n" + json.dumps({"prompt": "ab", "completion": "cdefg"}) + "\n")
    docs = read_documents(j, Tok(), seq_len=8)
    assert docs[0] == (Tok().encode("hello th"), 0)
    assert docs[1] == (Tok().encode("abcdefg"), 1)  # trained from the prompt's last token
    j.write_text('{"foo": 1}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1: expected 'text'"):
        read_documents(j, Tok(), seq_len=8)
    j.write_text('"some text"\n')  # a JSON string, not an object: no substring test on it
    with pytest.raises(ValueError, match=r"d.jsonl:1: expected a JSON object"):
        read_documents(j, Tok(), seq_len=8)
    j.write_text('{"text": "x"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: not valid JSON"):
        read_documents(j, Tok(), seq_len=8)


def test_cache_dir_with_other_files_is_refused_and_kept(base, tmp_path):
    # --cache-dir pointed at a model folder: nothing of it may be deleted.
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ValueError, match="not a hidden-state cache.*model.safetensors"):
        build_cache(tmp_path, base, base_lm_head(base), key="k", prompts=random_prompts(2), eos={EOS}, max_tokens=4)
    assert (tmp_path / "model.safetensors").read_bytes() == b"weights"
    with pytest.raises(ValueError, match="is a file"):
        build_cache(tmp_path / "model.safetensors", base, base_lm_head(base), key="k", prompts=random_prompts(2))


def test_fewer_rows_than_a_batch_is_an_error_not_a_hang(base, cache):
    folder, meta = cache
    usable = meta["rows"]["train"] - meta["sequences"]["train"]
    with pytest.raises(ValueError, match=f"{usable} training rows, fewer than --batch-size {usable + 1}"):
        train(tiny_heads(base), base_lm_head(base), folder, meta, steps=2, batch_size=usable + 1, lr=1e-3, warmup=1)


def test_resume_refuses_another_layout_and_a_broken_state(base, tmp_path):
    import mlx.optimizers as optim

    from exo_medusa_mlx.training.checkpoints import resume_step, save_checkpoint

    heads = tiny_heads(base)
    opt = optim.AdamW(learning_rate=1e-3)
    opt.init(heads.trainable_parameters())
    ck = tmp_path / "checkpoint"
    save_checkpoint(ck, heads, opt, 7)
    save_checkpoint(ck, heads, opt, 9)  # replaces the previous one whole, leaves nothing beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    other = new_heads(MedusaConfig(num_heads=K + 1, hidden_size=base.args.hidden_size, vocab_size=VOCAB),
                      base.lm_head.weight, 0)
    with pytest.raises(ValueError, match="another layout"):
        resume_step(ck, other)
    assert resume_step(ck, tiny_heads(base, seed=5)) == 9
    (ck / "state.json").write_text("{broken")
    with pytest.raises(ValueError, match="state.json is unreadable"):
        resume_step(ck, tiny_heads(base))


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "unrecognized arguments: --steps"),  # no abbreviation of --steps-per-eval
    (["--iters", "0"], "argument --iters: 0 must be at least 1"),
    (["--epochs", "0"], "argument --epochs: 0 must be > 0"),
    (["--warmup", "-5"], "argument --warmup: -5 must be >= 0"),
    (["--learning-rate", "-1"], "argument --learning-rate: -1 must be > 0"),
    (["--self-instruct", "-1"], "argument --self-instruct: -1 must be >= 0"),
    (["--data", "d.txt", "--add-prompts", "p.jsonl"], "--add-prompts and --self-instruct add prompts"),
    (["--add-prompts", "missing.jsonl"], "prompt file missing.jsonl not found"),
])
def test_train_flags_are_checked_before_any_work(tmp_path, argv, message, capsys):
    from exo_medusa_mlx.training.train import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["-o", str(out), *argv])
    assert message in capsys.readouterr().err + str(e.value.code)
    assert not out.exists() or not any(out.iterdir())


def test_train_output_that_is_a_file_is_refused(tmp_path):
    from exo_medusa_mlx.training.train import main

    f = tmp_path / "heads"
    f.write_text("keep me")
    with pytest.raises(SystemExit, match="--output .* is a file"):
        main(["-o", str(f), "--iters", "1"])
    assert f.read_text() == "keep me"


def test_train_options_mirror_the_flags(tmp_path, capsys):
    """One TrainOptions field per flag, with the parser's defaults; a bad --add-prompts line
    fails before the model loads or the output folder is made."""
    from dataclasses import fields

    from exo_medusa_mlx.training.options import TrainOptions, setup_arg_parser
    from exo_medusa_mlx.training.train import main

    p = setup_arg_parser()
    assert {a.dest for a in p._actions if a.dest != "help"} == {f.name for f in fields(TrainOptions)}
    assert TrainOptions.from_args(p.parse_args(["-o", "x"])) == TrainOptions(output="x")
    bad = tmp_path / "mine.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": 3}\n')
    with pytest.raises(SystemExit) as e:
        main(["-o", str(tmp_path / "out"), "--add-prompts", str(bad)])
    assert "mine.jsonl:2: expected" in str(e.value.code) and not (tmp_path / "out").exists()
