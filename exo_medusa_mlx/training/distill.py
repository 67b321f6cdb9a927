"""Data for Medusa head training: the frozen base model's own answers to many prompts at
once (self-distillation, continuous batching over mlx-lm's model), or text relabelled
with its predictions, streamed into hidden-state files (``build_cache``) that a killed
run resumes from.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm.auto import tqdm

from .hidden_files import SPLITS, PartWriter, Row, check_folder, done_sequences, part_files, write_json

TEACHER_TOPK = 8  # base-model top-k kept per row, for --loss kl
TOPK_BLOCK = 128  # vocabulary block of the two-stage top-k
MIN_PREFIX = 4  # shorter shared prompt prefixes are not worth a separate pass
PREFILL_TOKENS = 16384  # prompt tokens prefilled at once: attention's scores grow with the square of a prompt
LANE_TOKENS = 65536  # cache positions of a lane (rows x longest prompt): 3 GB of keys and values at 135M
# 2: parts hold the token fed after each row. Since then teacher_probs are the top-k's own softmax
# (the KL loss renormalises them anyway, so older parts train the same) and parts list their sequences.
CACHE_VERSION = 2


# --------------------------------------------------------------------------- one step's outputs


def top_k(logits: mx.array, k: int) -> tuple[mx.array, mx.array, mx.array]:
    """Argmax (the first of equal maxima, as ``mx.argmax``) and the exact top-k (ids, values) per row.

    Ranking the whole vocabulary costs more than the lm_head itself on a CPU, so
    this ranks blocks: the k blocks with the largest maxima hold the k largest
    values, and only their k * TOPK_BLOCK candidates are ranked. logits: (B, V).
    """
    B, V = logits.shape
    nb = -(-V // TOPK_BLOCK)
    if nb <= k:  # a small vocabulary: rank it whole
        ids = mx.argpartition(-logits, kth=k - 1, axis=-1)[:, :k]
        return mx.argmax(logits, axis=-1), ids, mx.take_along_axis(logits, ids, axis=-1)
    if V % TOPK_BLOCK:
        logits = mx.pad(logits, [(0, 0), (0, nb * TOPK_BLOCK - V)], constant_values=-mx.inf)
    blocks = logits.reshape(B, nb, TOPK_BLOCK)
    bmax = blocks.max(axis=-1)  # (B, nb)
    best = mx.argpartition(-bmax, kth=k - 1, axis=-1)[:, :k]  # (B, k) blocks
    cand = mx.take_along_axis(blocks, best[..., None], axis=1).reshape(B, k * TOPK_BLOCK)
    j = mx.argpartition(-cand, kth=k - 1, axis=-1)[:, :k]
    ids = mx.take_along_axis(best, j // TOPK_BLOCK, axis=-1) * TOPK_BLOCK + j % TOPK_BLOCK
    first = mx.argmax(bmax, axis=-1)  # the first block holding the maximum holds its first index
    inner = mx.argmax(mx.take_along_axis(blocks, first[:, None, None], axis=1)[:, 0], axis=-1)
    return first * TOPK_BLOCK + inner, ids, mx.take_along_axis(cand, j, axis=-1)


def sample(logits: np.ndarray, temp: float, seed: int, index: list[int], step: list[int]) -> np.ndarray:
    """One token per row from softmax(logits / temp), by the inverse CDF.

    Row j's uniform draw depends only on (seed, index[j], step[j]), so a sequence
    samples the same path in any batch, and a resumed run redraws what was lost.
    """
    z = np.exp((logits - logits.max(axis=-1, keepdims=True)) / temp)  # (b, V)
    cdf = np.cumsum(z, axis=-1, dtype=np.float64)
    u = np.array([np.random.default_rng([seed, i, s]).random() for i, s in zip(index, step)]) * cdf[:, -1]
    return np.minimum((cdf <= u[:, None]).sum(axis=-1), logits.shape[-1] - 1)


def _outputs(lm_head, h: mx.array, states: bool) -> dict[str, mx.array]:
    """The lazy outputs of one position of each row: logits, argmax, and with ``states`` the top-k."""
    logits = lm_head(h)  # (b, V)
    if not states:
        return {"logits": logits, "label": mx.argmax(logits, axis=-1)}
    label, ids, vals = top_k(logits, TEACHER_TOPK)
    return {"logits": logits, "label": label, "ids": ids, "vals": vals, "h": h}


def _record(out: dict, rows: list[Row], live: list[bool], temp: float, seed: int, greedy: set[int]) -> np.ndarray:
    """Label, sample and record one position of each live row (``out``: evaluated ``_outputs``);
    return the tokens fed next."""
    lab = np.array(out["label"])
    tok = lab.copy()
    picks = [j for j, r in enumerate(rows) if live[j] and temp > 0 and r.index not in greedy]
    if picks:
        tok[picks] = sample(np.array(out["logits"][mx.array(picks)]), temp, seed, [rows[j].index for j in picks],
                            [len(rows[j].nexts) for j in picks])
    states = "h" in out
    if states:
        h, ids, vals = np.array(out["h"]), np.array(out["ids"]), np.array(out["vals"])
        order = np.argsort(-vals, axis=-1, kind="stable")  # best first
        ids, vals = np.take_along_axis(ids, order, -1), np.take_along_axis(vals, order, -1)
        probs = np.exp(vals - vals[:, :1])
        probs /= probs.sum(-1, keepdims=True)
    for j, row in enumerate(rows):
        if live[j]:
            row.nexts.append(int(tok[j]))
            if states:
                row.labels.append(int(lab[j]))
                row.hidden.append(h[j])
                row.ids.append(ids[j])
                row.probs.append(probs[j])
    return tok


# --------------------------------------------------------------------------- frozen model passes


def _left_pad(seqs: list[list[int]]) -> tuple[mx.array, list[int]]:
    L = max(len(s) for s in seqs)
    pad = [L - len(s) for s in seqs]
    return mx.array([[0] * p + list(s) for p, s in zip(pad, seqs)], dtype=mx.int32), pad


def shared_prefix(base, prompts: list[list[int]]) -> tuple[int, list] | None:
    """(P, per-layer (keys, values)) of the prefix all ``prompts`` share (a chat template's
    system turn), run once; None when it is shorter than MIN_PREFIX. Every prompt keeps one
    token past it, so its last hidden state comes from the batch."""
    from mlx_lm.models.cache import KVCache

    P = min(len(os.path.commonprefix(prompts)), min(len(p) for p in prompts) - 1)
    if P < MIN_PREFIX:
        return None
    cache = [KVCache() for _ in base.model.layers]
    base.model(mx.array(prompts[0][:P])[None], cache=cache)
    kv = [(c.keys[..., :P, :], c.values[..., :P, :]) for c in cache]  # (1, n_kv, P, D)
    mx.eval(kv)
    return P, kv


def _prefill(base, seqs: list[list[int]], prefix) -> tuple[mx.array, list]:
    """Hidden states at each prompt's last token, (b, H), and the batch's caches (left-padded,
    as BatchKVCache wants). With a shared ``prefix``, only the rest of each prompt is run:
    right-padded after the prefix's cached keys, then rolled left-padded (``finalize``, as
    mlx-lm's BatchGenerator does with prompt caches)."""
    from mlx_lm.models.cache import BatchKVCache

    if prefix is None:
        x, pad = _left_pad(seqs)
        cache = [BatchKVCache(pad) for _ in base.model.layers]
        return base.model(x, cache=cache)[:, -1], cache
    P, kv = prefix
    b, tails = len(seqs), [s[P:] for s in seqs]
    lengths = [len(t) for t in tails]
    right = [max(lengths) - n for n in lengths]
    cache = [BatchKVCache([0] * b) for _ in base.model.layers]
    for c, (k, v) in zip(cache, kv):
        c.update_and_fetch(mx.broadcast_to(k, (b, *k.shape[1:])), mx.broadcast_to(v, (b, *v.shape[1:])))
        c.prepare(right_padding=right)
    x = mx.array([t + [0] * r for t, r in zip(tails, right)], dtype=mx.int32)
    h = base.model(x, cache=cache)  # (b, L, H)
    h = h[mx.arange(b), mx.array(lengths) - 1]
    for c in cache:
        c.finalize()
    return h, cache


def _joining(queue: deque, prompts, free: int, rows: int) -> int:
    """How many queued prompts join a lane of ``rows`` rows with room for ``free`` more: as many
    as the prefill and cache budgets allow (long prompts join a few at a time); one into an
    empty lane."""
    n = 0
    while n < min(free, len(queue)):
        longest = len(prompts[queue[n]])  # the queue runs shortest first
        if (n or rows) and ((n + 1) * longest > PREFILL_TOKENS or (rows + n + 1) * longest > LANE_TOKENS):
            break
        n += 1
    return n


class _Lane:
    """One continuous batch on its own MLX stream: a CPU stream runs on its own thread, so two
    lanes keep two cores busy where MLX's element-wise ops use one.

    Prompts join the lane when it is half empty (prefill, then BatchKVCache ``extend``).
    A finished row stays in the batch, its outputs ignored, until an eighth of the lane
    is finished: each ``filter`` copies every layer's cache.
    """

    def __init__(self, stream, size: int):
        self.stream, self.size = stream, size
        self.batch: list[Row] = []  # the rows in the cache, in batch order
        self.finished: set[int] = set()  # batch positions whose answer is done
        self.cache = self.y = None  # per-layer BatchKVCache; y: (B,) the last tokens, not yet fed
        self.first, self.rows = 0, []  # the rows the planned step makes, from batch position first

    def _compact(self) -> None:
        keep = [j for j in range(len(self.batch)) if j not in self.finished]
        if not keep:
            self.batch, self.cache, self.y = [], None, None
        elif len(keep) < len(self.batch):
            k = mx.array(keep)
            for c in self.cache:
                c.filter(k)
            self.batch, self.y = [self.batch[j] for j in keep], self.y[k]
        self.finished = set()

    def plan(self, base, lm_head, queue: deque, prompts, prefix, states: bool) -> dict | None:
        """Build (lazily) this step's outputs: prefill new prompts, or one token for every row."""
        with mx.stream(self.stream):
            n = 0
            if queue and len(self.batch) - len(self.finished) <= self.size // 2:
                self._compact()
                n = _joining(queue, prompts, self.size - len(self.batch), len(self.batch))
            if n:
                new = [Row(queue.popleft()) for _ in range(n)]
                h, fresh = _prefill(base, [prompts[r.index] for r in new], prefix)
                if self.cache is None:
                    self.cache = fresh
                else:
                    for c, more in zip(self.cache, fresh):
                        c.extend(more)
                self.first, self.rows = len(self.batch), new
                self.batch = self.batch + new
            elif len(self.finished) < len(self.batch):
                if len(self.finished) >= max(self.size // 8, 1):
                    self._compact()
                h = base.model(self.y[:, None], cache=self.cache)[:, 0]  # (B, H) at the fed tokens
                self.first, self.rows = 0, self.batch
            else:
                return None
            return _outputs(lm_head, h, states)

    def record(self, out: dict, eos, max_tokens, temp, seed, greedy) -> tuple[list[Row], int]:
        """Record the evaluated step; return the rows it finished and the rows it made."""
        live = [self.first + j not in self.finished for j in range(len(self.rows))]
        tok = _record(out, self.rows, live, temp, seed, greedy)
        fed = mx.array(tok.astype(np.int32))
        self.y = fed if self.first == 0 else mx.concatenate([self.y, fed])
        done = []
        for j, row in enumerate(self.rows):
            if live[j] and (int(tok[j]) in eos or len(row.nexts) >= max_tokens):
                self.finished.add(self.first + j)
                done.append(row)
        return done, sum(live)


def self_distill(base, lm_head, prompts: list[list[int]], eos: set[int], max_tokens: int, batch_size: int,
                 temp: float = 0.0, seed: int = 0, progress=None, greedy: set[int] | None = None,
                 indices: list[int] | None = None, states: bool = True, lanes: int = 1):
    """Generate the base model's answers in continuous batches; yield (index, Row) as each finishes.

    Answers are sampled at ``temp`` (greedy at 0), except for the prompt indices in
    ``greedy``; ``indices`` picks the prompts to answer (default all). A row of a
    sequence is the last prompt position or a response token but the last: the
    hidden state there, the base model's argmax (``labels``; the next token when
    greedy), the token fed after it (``nexts``) and the top-k. With ``states`` off
    only ``nexts`` (the answer) is kept. ``batch_size`` sequences run at once, split
    over ``lanes`` MLX streams (see _Lane; with more than one, each GEMM gets one
    BLAS thread). Prompts join shortest first; their shared prefix runs once.
    ``progress(n)`` is told the rows each step makes.
    """
    from .._blas import set_blas_threads

    greedy = greedy or set()
    queue = deque(sorted(range(len(prompts)) if indices is None else indices, key=lambda i: len(prompts[i])))
    if not queue:
        return
    prefix = shared_prefix(base, [prompts[i] for i in queue])
    lanes = max(min(lanes, batch_size), 1) if mx.default_device() == mx.cpu else 1  # a GPU needs no lanes
    pool = [_Lane(mx.new_stream(mx.cpu) if lanes > 1 else mx.default_stream(mx.default_device()),
                  batch_size // lanes + (k < batch_size % lanes)) for k in range(lanes)]
    threads = set_blas_threads(1) if lanes > 1 else None
    try:
        while True:
            outs = [lane.plan(base, lm_head, queue, prompts, prefix, states) for lane in pool]
            if not any(o is not None for o in outs):
                return
            mx.eval([o for o in outs if o is not None])
            for lane, out in zip(pool, outs):
                if out is None:
                    continue
                finished, made = lane.record(out, eos, max_tokens, temp, seed, greedy)
                if progress is not None:
                    progress(made)
                for row in finished:
                    yield row.index, row
    finally:
        if threads is not None:
            set_blas_threads(threads)


def relabel(base, lm_head, docs: list[tuple[list[int], int]], batch_size: int, indices: list[int] | None = None):
    """Run the base model over documents; yield (index, Row) with its own predictions as labels."""
    from mlx_lm.models.cache import BatchKVCache

    order = sorted(range(len(docs)) if indices is None else indices, key=lambda i: len(docs[i][0]))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        x, pad = _left_pad([docs[i][0] for i in idx])
        h = base.model(x, cache=[BatchKVCache(pad) for _ in base.model.layers])  # (b, L, H)
        for j, i in enumerate(idx):
            ids, start = docs[i]
            hj = h[j, pad[j] + start : pad[j] + len(ids)]  # (n, H)
            label, tids, vals = top_k(lm_head(hj), TEACHER_TOPK)
            mx.eval(hj, label, tids, vals)
            row = Row(i)
            row.hidden, row.labels = list(np.array(hj)), np.array(label).tolist()
            row.nexts = list(ids[start + 1 :]) + row.labels[-1:]  # the text's next token (the last has none)
            v = np.array(vals)
            p = np.exp(v - v.max(-1, keepdims=True))
            row.ids, row.probs = list(np.array(tids)), list(p / p.sum(-1, keepdims=True))
            yield i, row


# --------------------------------------------------------------------------- the cache


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
