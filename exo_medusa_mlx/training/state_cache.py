"""The cache of the frozen model's hidden states over the training data: self-distilled or
relabelled rows (``distill``) streamed into hidden-state files that a killed run resumes
from, and reused by any run over the same data (``cache_key``).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .distill import relabel, self_distill
from .hidden_files import SPLITS, PartWriter, check_folder, done_sequences, part_files, write_json

# 2: parts hold the token fed after each row. Since then teacher_probs are the top-k's own softmax
# (the KL loss renormalises them anyway, so older parts train the same) and parts list their sequences.
CACHE_VERSION = 2


def cache_key(**facts) -> str:
    return hashlib.sha256(json.dumps({**facts, "v": CACHE_VERSION}, sort_keys=True).encode()).hexdigest()[:16]


def _open_cache(folder: Path, key: str) -> tuple[dict | None, dict | None]:
    """(meta of a finished cache with this key, progress of an unfinished one), refusing other data.

    A finished cache, or an unfinished one with complete parts, of other data (or
    another seed, split, length) is hours of work: never overwritten. Parts without
    a progress file, or not listed in it, are half-written: deleted.
    """
    check_folder(folder)
    meta_path, progress_path = folder / "meta.json", folder / "progress.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            return meta, None
        raise ValueError(f"{folder} holds hidden states of other data ({meta.get('data', '?')}; or another "
                         "--seed, --val-split or --max-tokens, or an older cache format): pass another "
                         "--cache-dir, or delete that folder")
    progress = json.loads(progress_path.read_text()) if progress_path.is_file() else None
    if progress is not None and progress.get("key") != key and any(progress["splits"].values()):
        raise ValueError(f"{folder} holds an unfinished cache of other data ({progress.get('data', '?')}): run "
                         "that command again to finish it, pass another --cache-dir, or delete that folder")
    if progress is not None and progress.get("key") != key:
        progress = None
    listed = {f["file"] for files in (progress or {"splits": {}})["splits"].values() for f in files}
    for f in part_files(folder):
        if f.name not in listed:
            f.unlink()
    return None, progress


def build_cache(folder: str | Path, base, lm_head, *, key: str, prompts: list[list[int]] | None = None,
                eos: set[int] | None = None, docs: list[tuple[list[int], int]] | None = None,
                val_split: float = 0.0, max_tokens: int = 160, batch_size: int = 32, temp: float = 0.0,
                seed: int = 0, samples: int = 1, lanes: int = 1, log=print) -> dict:
    """Run the frozen model once over the data and write parts to ``folder``; reuse them if ``key`` matches.

    ``prompts`` (token ids, chat template applied) are self-distilled, stopping at
    ``eos``; ``docs`` (ids, first trained position) are relabelled. A ``val_split``
    fraction of the sequences, drawn with ``seed``, goes to the val split. With
    ``samples`` > 1 each prompt is answered that many times, greedily first and
    then sampled at ``temp``; the split is drawn by prompt, so no val prompt is
    trained on. ``lanes``: see self_distill. A killed run resumes after its last
    complete part. Returns the cache's meta.
    """
    if samples < 1 or (samples > 1 and (prompts is None or temp <= 0)):
        raise ValueError(f"samples per prompt {samples}: must be 1, or more with prompts and a temperature > 0")
    folder = Path(folder)
    meta, progress = _open_cache(folder, key)
    if meta is not None:
        return meta
    folder.mkdir(parents=True, exist_ok=True)
    n = len(prompts) if prompts is not None else len(docs)
    n_val = max(int(round(val_split * n)), 1 if n > 1 else 0) if val_split > 0 else 0
    val = {int(i) + j * n for i in np.random.default_rng(seed).permutation(n)[:n_val] for j in range(samples)}
    if prompts is not None:
        what = f"self-distilled: {n} prompts, max {max_tokens} tokens, temp {temp}"
        what += f", {samples} responses each (the first greedy)" if samples > 1 else ""
    else:
        what = f"relabelled: {n} documents"
    splits = progress["splits"] if progress else {s: [] for s in SPLITS}
    done = done_sequences(folder, splits["train"] + splits["val"])
    todo = [i for i in range(n * samples) if i not in done]
    before = progress["seconds"] if progress else 0.0
    tic = time.perf_counter()

    def save_progress():
        write_json(folder / "progress.json", {"key": key, "data": what, "seconds": before + time.perf_counter() - tic,
                                              "splits": {s: w.files for s, w in writers.items()}})

    writers = {s: PartWriter(folder, s, splits[s], on_flush=save_progress) for s in SPLITS}
    save_progress()
    made = _fill(writers, val, todo, len(done), prompts, docs, base, lm_head, eos, max_tokens, batch_size, temp,
                 seed, samples, lanes)
    seconds = time.perf_counter() - tic
    meta = {"key": key, "data": what, "hidden_size": int(base.args.hidden_size),
            "seconds": round(before + seconds, 1), "rows_per_s": round(made / max(seconds, 1e-9), 1),
            "splits": {s: w.files for s, w in writers.items()},
            "rows": {s: sum(f["rows"] for f in w.files) for s, w in writers.items()},
            "sequences": {s: sum(f["sequences"] for f in w.files) for s, w in writers.items()}}
    if meta["rows"]["train"] == 0 and meta["rows"]["val"] == 0:
        raise ValueError("the data gave no training rows: use longer responses or documents")
    write_json(folder / "meta.json", meta)
    (folder / "progress.json").unlink()
    log(f"frozen model: {made} rows in {seconds:.1f} s, {meta['rows_per_s']:.0f} rows/s"
        + (f" (resumed after {len(done)} of {n * samples} sequences)" if done else ""))
    return meta


def _fill(writers, val, todo, done, prompts, docs, base, lm_head, eos, max_tokens, batch_size, temp, seed,
          samples, lanes) -> int:
    """Stream the sequences ``todo`` into the writers; return the rows made."""
    tic = time.perf_counter()
    made = [0]

    def progress(k):
        made[0] += k
        bar.set_postfix(rows=made[0], rows_per_s=f"{made[0] / (time.perf_counter() - tic):.0f}", refresh=False)

    n = len(prompts) if prompts is not None else len(docs)
    if prompts is not None:
        stream = self_distill(base, lm_head, prompts * samples, eos or set(), max_tokens, batch_size, temp, seed,
                              progress, greedy=set(range(n)) if samples > 1 else None, indices=todo, lanes=lanes)
    else:
        stream = relabel(base, lm_head, docs, batch_size, indices=todo)
    with tqdm(total=done + len(todo), initial=done, desc="frozen model",
              unit="response" if prompts is not None else "doc") as bar:
        for i, row in stream:
            writers["val" if i in val else "train"].add(row)
            if prompts is None:
                progress(len(row.labels))
            bar.update(1)
    for w in writers.values():
        w.flush()
    return made[0]
