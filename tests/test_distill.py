"""Batched self-distillation on tiny random models: the rows are the base model's own
(against a plain forward and mlx-lm's greedy decoding), sampling is per sequence, the
top-k is exact, and a killed cache build resumes from its last complete part."""

import itertools
import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step as mlx_generate_step

import exo_medusa_mlx.training.hidden_files as hidden_files
from exo_medusa_mlx.training.distill import TEACHER_TOPK, sample, self_distill, shared_prefix, top_k
from exo_medusa_mlx.training.state_cache import build_cache
from exo_medusa_mlx.model import base_lm_head
from helpers.training import EOS, base, random_prompts  # noqa: F401 (base: a fixture)


@pytest.mark.parametrize("V", [4096, 3000, 96])  # whole blocks, a padded last block, one block
def test_top_k_is_exact_and_argmax_takes_the_first_maximum(V):
    rng = np.random.default_rng(V)
    logits = rng.standard_normal((6, V)).astype(np.float32)
    logits[0, [7, 900 % V, V - 1]] = 9.0  # tied maxima: the first one wins, as in mx.argmax
    logits[1, [V - 1, 5]] = 9.0
    logits[2, :] = 0.0  # all equal
    label, ids, vals = (np.array(a) for a in top_k(mx.array(logits), TEACHER_TOPK))
    np.testing.assert_array_equal(label, np.array(mx.argmax(mx.array(logits), axis=-1)))
    np.testing.assert_array_equal(np.sort(vals, -1), np.sort(logits, -1)[:, -TEACHER_TOPK:])
    np.testing.assert_array_equal(np.take_along_axis(logits, ids, -1), vals)
    assert all(len(set(r)) == TEACHER_TOPK for r in ids.tolist())


def test_sample_follows_softmax_and_depends_only_on_its_key():
    logits = np.array([[2.0, 1.0, 0.0, -1.0, -30.0]], np.float32)
    n = 20000
    got = sample(np.repeat(logits, n, 0), 0.8, 7, list(range(n)), [3] * n)
    freq = np.bincount(got, minlength=5) / n
    p = np.exp(logits[0] / 0.8) / np.exp(logits[0] / 0.8).sum()
    assert np.abs(freq - p).max() < 0.015, (freq, p)
    again = sample(np.repeat(logits, 5, 0), 0.8, 7, [4, 3, 2, 1, 0], [3] * 5)
    np.testing.assert_array_equal(again, got[[4, 3, 2, 1, 0]])  # any batch, any order


@pytest.mark.parametrize("lanes, prefix", [(1, ()), (2, (5, 9, 17, 33, 40, 61))])
def test_rows_are_the_base_models_own(base, lanes, prefix):
    """Every row (hidden state, argmax label, top-k) of the continuous batch equals one plain
    forward over the prompt and its answer; answers equal mlx-lm's greedy decoding. Also
    with two lanes (streams) and a prefix all prompts share (run once, then rolled)."""
    lm = base_lm_head(base)
    prompts = random_prompts(9, seed=3, prefix=prefix)
    assert (shared_prefix(base, prompts) or (0,))[0] == len(prefix)
    got = dict(self_distill(base, lm, prompts, {EOS}, 20, batch_size=4, lanes=lanes))
    assert sorted(got) == list(range(9))
    for i, p in enumerate(prompts):
        row = got[i]
        ref = [t for t, _ in itertools.islice(mlx_generate_step(mx.array(p), base), 20)]
        assert row.nexts == (ref[: ref.index(EOS) + 1] if EOS in ref else ref), i
        h = base.model(mx.array(p + row.nexts[:-1])[None])[0, len(p) - 1 :]  # (n, H)
        np.testing.assert_allclose(np.stack(row.hidden), np.array(h), atol=1e-4)
        logits = np.array(lm(h))
        assert row.labels == logits.argmax(-1).tolist() == row.nexts
        top = np.sort(logits, -1)[:, ::-1][:, :TEACHER_TOPK]
        np.testing.assert_allclose(np.take_along_axis(logits, np.stack(row.ids), -1), top, rtol=1e-5)
        np.testing.assert_allclose(np.stack(row.probs).sum(-1), 1.0, rtol=1e-5)


def test_sampled_answers_do_not_depend_on_the_batch(base):
    lm = base_lm_head(base)
    prompts = random_prompts(6, seed=4)
    runs = [dict(self_distill(base, lm, prompts, {EOS}, 14, batch_size=b, temp=1.0, seed=5, lanes=n))
            for b, n in ((1, 1), (3, 1), (6, 2))]
    for i in range(6):
        assert runs[0][i].nexts == runs[1][i].nexts == runs[2][i].nexts, i
    assert any(r.nexts != r.labels for r in runs[0].values())  # sampled, not greedy
    tokens_only = dict(self_distill(base, lm, prompts, {EOS}, 14, batch_size=3, temp=1.0, seed=5, states=False))
    assert all(tokens_only[i].nexts == runs[0][i].nexts and not tokens_only[i].hidden for i in range(6))


def _rows_by_sequence(folder, meta):
    from safetensors.numpy import load_file

    out = {}
    for split in ("train", "val"):
        for f in meta["splits"][split]:
            d = load_file(str(folder / f["file"]))
            ends = np.flatnonzero(d["left"] == 0) + 1
            for seq, lab in zip(d["sequences"].tolist(), np.split(d["labels"], ends)[:-1]):
                out[seq] = (split, lab.tolist())
    return out


def test_killed_build_resumes_from_its_last_complete_part(base, tmp_path, monkeypatch):
    lm = base_lm_head(base)
    prompts = random_prompts(30, seed=6)
    kw = dict(key="k", prompts=prompts, eos={EOS}, val_split=0.2, max_tokens=16, batch_size=8, log=lambda *_: None)
    monkeypatch.setattr(hidden_files, "PART_ROWS", 40)
    whole = build_cache(tmp_path / "whole", base, lm, **kw)

    real, flushes = hidden_files.PartWriter.flush, []

    def flush_then_die(self):
        real(self)
        flushes.append(self.split)
        if len(flushes) == 3:
            raise KeyboardInterrupt  # killed right after the third part

    monkeypatch.setattr(hidden_files.PartWriter, "flush", flush_then_die)
    folder = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        build_cache(folder, base, lm, **kw)
    monkeypatch.setattr(hidden_files.PartWriter, "flush", real)
    progress = json.loads((folder / "progress.json").read_text())
    kept = {f["file"]: (folder / f["file"]).read_bytes() for s in progress["splits"].values() for f in s}
    assert len(kept) == 3 and not (folder / "meta.json").exists()
    (folder / "train-00009.safetensors.tmp").write_bytes(b"half")  # a part cut by the kill

    with pytest.raises(ValueError, match="unfinished cache of other data"):
        build_cache(folder, base, lm, **{**kw, "key": "other"})
    done = hidden_files.done_sequences(folder, [f for s in progress["splits"].values() for f in s])
    asked = []
    import exo_medusa_mlx.training.state_cache as D  # where build_cache calls it

    real_distill = D.self_distill
    monkeypatch.setattr(D, "self_distill", lambda *a, indices=None, **k: asked.extend(indices) or real_distill(
        *a, indices=indices, **k))
    meta = build_cache(folder, base, lm, **kw)
    assert sorted(asked) == sorted(set(range(30)) - done)  # only what no complete part holds
    assert all((folder / f).read_bytes() == b for f, b in kept.items())  # the complete parts kept as they were
    assert not (folder / "progress.json").exists() and not list(folder.glob("*.tmp"))
    assert meta["sequences"] == whole["sequences"] and meta["rows"] == whole["rows"]
    assert _rows_by_sequence(folder, meta) == _rows_by_sequence(tmp_path / "whole", whole)
    assert build_cache(folder, base, lm, **kw) == meta  # finished: reused
    with pytest.raises(ValueError, match="other data"):
        build_cache(folder, base, lm, **{**kw, "key": "other"})


def test_speed_script_runs_and_checks_the_rows(tmp_path, capsys):
    """scripts/distill_speed.py on a tiny model folder: both passes, the same answers, and the
    batched rows equal to one plain forward."""
    from helpers.folders import save_hf_folder
    from helpers.processes import load_script
    from helpers.tiny import N_LAYERS, tiny_base

    folder = save_hf_folder(tmp_path / "model", "llama", tiny_base("llama", layers=N_LAYERS))
    script = load_script("distill_speed")
    script.main(["--model", str(folder), "--num-prompts", "4", "--max-tokens", "6", "--batch-size", "4"])
    out = capsys.readouterr().out
    assert "sequential (batch 1):" in out and "batched (batch 4, 2 lanes):" in out and "rows per CPU-second" in out
    assert "token-identical, batched vs sequential: 4 of 4 prompts" in out
    assert "labels differing 0 of" in out
