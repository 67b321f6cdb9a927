"""Data for Medusa head training: the frozen base model's own answers to many prompts at
once (self-distillation, continuous batching over mlx-lm's model), or text relabelled
with its predictions, row by row (``state_cache.build_cache`` streams them into
hidden-state files).
"""

from __future__ import annotations

import os
from collections import deque

import mlx.core as mx
import numpy as np

from .hidden_files import Row

TEACHER_TOPK = 8  # base-model top-k kept per row, for --loss kl
TOPK_BLOCK = 128  # vocabulary block of the two-stage top-k
MIN_PREFIX = 4  # shorter shared prompt prefixes are not worth a separate pass
PREFILL_TOKENS = 16384  # prompt tokens prefilled at once: attention's scores grow with the square of a prompt
LANE_TOKENS = 65536  # cache positions of a lane (rows x longest prompt): 3 GB of keys and values at 135M


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
