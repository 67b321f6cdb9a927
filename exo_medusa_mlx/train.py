"""``mlx_medusa train``: Medusa-1 heads on a frozen base model, in MLX.

The data is the base model's own: its responses to a prompt set (generated in
batches, greedy by default), or a text/JSONL file relabelled with its
predictions. The frozen model runs once; its last hidden states and its own
next-token choices go to shards on disk, and the heads train on those shards.
The base lm_head stays in the loss, so the heads learn in its vocabulary space.

Targets: a row is one position t with hidden state h_t and the base model's
argmax there, label_t (the token at t+1 for greedy data). Head i at t predicts
the token at t+2+i, so its target is label_{t+1+i}, weighted 0.8^i.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections import deque
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from tqdm.auto import tqdm

from .heads import MedusaHeads
from .heads_format import MedusaConfig

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_PROMPTS = DATA_DIR / "train_prompts.json"
HEAD_DECAY = 0.8  # head i's loss weight is HEAD_DECAY ** i
SHARD_ROWS = 8192  # rows per shard (a shard never splits a sequence)
TEACHER_TOPK = 8  # base-model top-k probabilities kept per row, for --loss kl
MIX_SHARDS = 4  # shards shuffled together in training
CACHE_VERSION = 1


# --------------------------------------------------------------------------- data sources


def read_prompts(path: str | Path) -> list[str]:
    """A JSON list of strings (or of {"prompt": ...}), or JSONL with "prompt"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found")
    text = path.read_text(encoding="utf-8")
    try:
        items = json.loads(text) if path.suffix == ".json" else [json.loads(l) for l in text.splitlines() if l.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"prompt file {path} is not valid JSON/JSONL: {e}") from None
    if not isinstance(items, list):
        items = [None]
    prompts = [x if isinstance(x, str) else x.get("prompt") if isinstance(x, dict) else None for x in items]
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError(f"prompt file {path} must hold a non-empty list of strings or {{\"prompt\": str}} objects")
    return prompts


def chat_ids(tokenizer, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None) is None:
        return tokenizer.encode(prompt)
    return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True))


def eos_ids(tokenizer) -> set[int]:
    return set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])


def read_documents(path: str | Path, tokenizer, seq_len: int) -> list[tuple[list[int], int]]:
    """(token ids, first trained position) per document of a text or JSONL file.

    JSONL lines hold "text", "messages" (chat, all trained) or "prompt" and
    "completion" (only the completion trained). A plain text file is split on
    blank lines. Documents are cut to ``seq_len`` tokens.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    text = path.read_text(encoding="utf-8")
    docs = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            if "text" in rec:
                docs.append((tokenizer.encode(rec["text"]), 0))
            elif "messages" in rec:
                docs.append((list(tokenizer.apply_chat_template(rec["messages"])), 0))
            elif "prompt" in rec and "completion" in rec:
                p = chat_ids(tokenizer, rec["prompt"])
                docs.append((p + tokenizer.encode(rec["completion"], add_special_tokens=False), len(p) - 1))
            else:
                raise ValueError(f"{path}:{n}: expected 'text', 'messages' or 'prompt'+'completion'")
    else:
        docs = [(tokenizer.encode(t.strip()), 0) for t in text.split("\n\n") if t.strip()]
    docs = [(ids[:seq_len], start) for ids, start in docs if start < min(len(ids), seq_len) - 2]
    if not docs:
        raise ValueError(f"{path}: no document has 3 or more tokens to train on")
    return docs


# --------------------------------------------------------------------------- frozen model passes


def _left_pad(seqs: list[list[int]]) -> tuple[mx.array, list[int]]:
    L = max(len(s) for s in seqs)
    pad = [L - len(s) for s in seqs]
    return mx.array([[0] * p + list(s) for p, s in zip(pad, seqs)], dtype=mx.int32), pad


def _teacher(logits: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """Argmax and top-k (ids, probs) of the base model. logits: (B, V)."""
    ids = mx.argpartition(-logits, kth=TEACHER_TOPK - 1, axis=-1)[:, :TEACHER_TOPK]
    probs = mx.take_along_axis(mx.softmax(logits, axis=-1), ids, axis=-1)
    return mx.argmax(logits, axis=-1), ids, probs


class _Row:
    """One sequence: its rows (hidden state, base argmax, base top-k) so far."""

    def __init__(self, index: int):
        self.index = index
        self.hidden, self.labels, self.ids, self.probs = [], [], [], []


def self_distill(base, lm_head, prompts: list[list[int]], eos: set[int], max_tokens: int, batch_size: int,
                 temp: float = 0.0, seed: int = 0, progress=None):
    """Generate the base model's responses in a continuous batch; yield (index, row) per finished prompt.

    A sequence's rows are the last prompt position and every response token but
    the last, each with the hidden state there and the base model's argmax (the
    next token, when greedy). Finished sequences leave the batch (``filter``);
    new prompts join it (``extend``) once it is half empty, as mlx-lm's
    BatchGenerator does, but here the hidden states are kept. ``progress(n)`` is
    told the rows each step makes.
    """
    from mlx_lm.models.cache import BatchKVCache

    mx.random.seed(seed)
    queue = deque(sorted(range(len(prompts)), key=lambda i: len(prompts[i])))
    active: list[_Row] = []
    cache = y = None  # per-layer BatchKVCache of the active rows; y: (B,) their last token, not yet fed
    while queue or active:
        if queue and len(active) <= batch_size // 2:
            idx = [queue.popleft() for _ in range(min(batch_size - len(active), len(queue)))]
            x, pad = _left_pad([prompts[i] for i in idx])
            new = [BatchKVCache(pad) for _ in base.model.layers]
            h = base.model(x, cache=new)[:, -1]  # (b, H) at each prompt's last token
            if cache is None:
                cache = new
            else:
                for c, n in zip(cache, new):
                    c.extend(n)
            rows = [_Row(i) for i in idx]
            active = active + rows
        else:
            h = base.model(y[:, None], cache=cache)[:, 0]  # (B, H) at the fed tokens
            rows = active
        logits = lm_head(h)
        tok = mx.argmax(logits, axis=-1) if temp == 0 else mx.random.categorical(logits / temp, axis=-1)
        label, ids, probs = _teacher(logits)
        y = tok if rows is active or y is None else mx.concatenate([y, tok])
        mx.eval(h, y, label, ids, probs)
        h_np, tok_np, lab, ids_np, pr = (np.array(a) for a in (h, tok, label, ids, probs))
        if progress is not None:
            progress(len(rows))
        for j, row in enumerate(rows):
            row.hidden.append(h_np[j])
            row.labels.append(int(lab[j]))
            row.ids.append(ids_np[j])
            row.probs.append(pr[j])
        done = {row.index for j, row in enumerate(rows)
                if int(tok_np[j]) in eos or len(row.labels) >= max_tokens}
        if done:
            keep = [j for j, row in enumerate(active) if row.index not in done]
            for row in active:
                if row.index in done:
                    yield row.index, row
            active = [active[j] for j in keep]
            if keep:
                k = mx.array(keep)
                for c in cache:
                    c.filter(k)
                y = y[k]
            else:
                cache = y = None


def relabel(base, lm_head, docs: list[tuple[list[int], int]], batch_size: int):
    """Run the base model over documents; yield (index, rows) with its own predictions as labels."""
    from mlx_lm.models.cache import BatchKVCache

    order = sorted(range(len(docs)), key=lambda i: len(docs[i][0]))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        x, pad = _left_pad([docs[i][0] for i in idx])
        h = base.model(x, cache=[BatchKVCache(pad) for _ in base.model.layers])  # (b, L, H)
        for j, i in enumerate(idx):
            ids, start = docs[i]
            hj = h[j, pad[j] + start : pad[j] + len(ids)]  # (n, H)
            label, tids, probs = _teacher(lm_head(hj))
            mx.eval(hj, label, tids, probs)
            row = _Row(i)
            row.hidden, row.labels = list(np.array(hj)), np.array(label).tolist()
            row.ids, row.probs = list(np.array(tids)), list(np.array(probs))
            yield i, row


# --------------------------------------------------------------------------- shards


class ShardWriter:
    """Buffers sequences and writes ``{split}-NNNNN.safetensors`` shards of about SHARD_ROWS rows."""

    def __init__(self, folder: Path, split: str):
        self.folder, self.split = folder, split
        self.buf: list[_Row] = []
        self.files: list[dict] = []

    def add(self, row: _Row) -> None:
        if len(row.labels) >= 2:  # one row alone has no head target
            self.buf.append(row)
        if sum(len(r.labels) for r in self.buf) >= SHARD_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        from safetensors.numpy import save_file

        hidden = np.concatenate([np.stack(r.hidden) for r in self.buf]).astype(np.float32)
        if np.isfinite(hidden.astype(np.float16)).all():
            hidden = hidden.astype(np.float16)  # half the disk; float32 if it would overflow
        # rows after each one in the same sequence: head i at t is valid iff left[t] >= i + 1
        left = np.concatenate([np.arange(len(r.labels))[::-1] for r in self.buf])
        name = f"{self.split}-{len(self.files):05d}.safetensors"
        save_file({
            "hidden": hidden,
            "labels": np.concatenate([r.labels for r in self.buf]).astype(np.int32),
            "left": left.astype(np.int32),
            "teacher_ids": np.concatenate([np.stack(r.ids) for r in self.buf]).astype(np.int32),
            "teacher_probs": np.concatenate([np.stack(r.probs) for r in self.buf]).astype(np.float16),
        }, str(self.folder / name))
        self.files.append({"file": name, "rows": int(len(left)), "sequences": len(self.buf)})
        self.buf = []


def cache_key(**facts) -> str:
    return hashlib.sha256(json.dumps({**facts, "v": CACHE_VERSION}, sort_keys=True).encode()).hexdigest()[:16]


def build_cache(folder: str | Path, base, lm_head, *, key: str, prompts: list[list[int]] | None = None,
                eos: set[int] | None = None, docs: list[tuple[list[int], int]] | None = None,
                val_split: float = 0.0, max_tokens: int = 160, batch_size: int = 32, temp: float = 0.0,
                seed: int = 0) -> dict:
    """Run the frozen model once over the data and write shards to ``folder``; reuse them if ``key`` matches.

    ``prompts`` (token ids, chat template applied) are self-distilled, stopping at
    ``eos``; ``docs`` (ids, first trained position) are relabelled. A ``val_split``
    fraction of the sequences, drawn with ``seed``, goes to the val split. Returns
    the cache's meta.
    """
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            return meta
    folder.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # written last: a cache without it is incomplete
    for f in folder.glob("*.safetensors"):
        f.unlink()
    n = len(prompts) if prompts is not None else len(docs)
    n_val = max(int(round(val_split * n)), 1 if n > 1 else 0) if val_split > 0 else 0
    val = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    writers = {"train": ShardWriter(folder, "train"), "val": ShardWriter(folder, "val")}
    tic = time.perf_counter()
    made = [0]

    def progress(n):
        made[0] += n
        bar.set_postfix(rows=made[0], rows_per_s=f"{made[0] / (time.perf_counter() - tic):.0f}", refresh=False)

    if prompts is not None:
        stream = self_distill(base, lm_head, prompts, eos or set(), max_tokens, batch_size, temp, seed, progress)
        unit, what = "prompt", f"self-distilled: {n} prompts, max {max_tokens} tokens, temp {temp}"
    else:
        stream = relabel(base, lm_head, docs, batch_size)
        unit, what = "doc", f"relabelled: {n} documents"
    with tqdm(total=n, desc="frozen model", unit=unit) as bar:
        for i, row in stream:
            writers["val" if i in val else "train"].add(row)
            if prompts is None:
                progress(len(row.labels))
            bar.update(1)
    for w in writers.values():
        w.flush()
    meta = {
        "key": key, "data": what, "hidden_size": int(base.args.hidden_size), "seconds": round(time.perf_counter() - tic, 1),
        "splits": {s: w.files for s, w in writers.items()},
        "rows": {s: sum(f["rows"] for f in w.files) for s, w in writers.items()},
        "sequences": {s: sum(f["sequences"] for f in w.files) for s, w in writers.items()},
    }
    if meta["rows"]["train"] == 0 and meta["rows"]["val"] == 0:
        raise ValueError("the data gave no training rows: use longer responses or documents")
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def load_shard(path: Path, num_heads: int) -> dict[str, np.ndarray]:
    """Rows of one shard with per-head targets, (rows, K); rows without any target dropped."""
    from safetensors.numpy import load_file

    d = load_file(str(path))
    n = len(d["labels"])
    step = 1 + np.arange(num_heads)
    valid = d["left"][:, None] >= step  # (n, K)
    idx = np.where(valid, np.arange(n)[:, None] + step, 0)
    keep = valid[:, 0]
    return {
        "hidden": d["hidden"][keep],
        "targets": np.where(valid, d["labels"][idx], -1)[keep],
        "teacher_ids": d["teacher_ids"][idx][keep],  # (n, K, k)
        "teacher_probs": d["teacher_probs"][idx][keep].astype(np.float32),
    }


def iterate_batches(folder: Path, files: list[str], num_heads: int, batch_size: int, rng=None):
    """Batches of rows; shuffled across MIX_SHARDS shards at a time when ``rng`` is given."""
    order = rng.permutation(len(files)) if rng is not None else np.arange(len(files))
    carry = None
    for g in range(0, len(order), MIX_SHARDS if rng is not None else 1):
        parts = [load_shard(folder / files[i], num_heads) for i in order[g : g + (MIX_SHARDS if rng is not None else 1)]]
        if carry is not None:
            parts.insert(0, carry)
        data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        n = len(data["targets"])
        perm = rng.permutation(n) if rng is not None else np.arange(n)
        full = n - n % batch_size if rng is not None else n
        for s in range(0, full, batch_size):
            yield {k: v[perm[s : s + batch_size]] for k, v in data.items()}
        carry = {k: v[perm[full:]] for k, v in data.items()} if full < n else None


# --------------------------------------------------------------------------- loss


def head_logits(heads: MedusaHeads, lm_head, h: mx.array) -> mx.array:
    """(K, B, V) logits of every head at hidden states h: (B, H)."""
    return heads.project(h, lm_head)[1:]


def loss_fn(heads: MedusaHeads, lm_head, h, targets, teacher_ids=None, teacher_probs=None):
    """Weighted CE (or top-k KL to the base model) summed over heads; also per-head loss and top-1.

    targets: (B, K) with -1 where the sequence ends; teacher_*: (B, K, k).
    """
    logits = head_logits(heads, lm_head, h).astype(mx.float32)  # (K, B, V)
    t = targets.T  # (K, B)
    valid = (t >= 0).astype(mx.float32)
    lse = mx.logsumexp(logits, axis=-1)
    if teacher_ids is None:
        picked = mx.take_along_axis(logits, mx.maximum(t, 0)[..., None], axis=-1)[..., 0]
    else:
        tid, tp = teacher_ids.transpose(1, 0, 2), teacher_probs.transpose(1, 0, 2)  # (K, B, k)
        tp = tp / tp.sum(-1, keepdims=True)
        picked = (mx.take_along_axis(logits, tid, axis=-1) * tp).sum(-1)
    per_head = ((lse - picked) * valid).sum(-1) / mx.maximum(valid.sum(-1), 1.0)  # (K,)
    weights = HEAD_DECAY ** mx.arange(per_head.shape[0], dtype=mx.float32)
    top1 = ((mx.argmax(logits, axis=-1) == t) * valid).sum(-1) / mx.maximum(valid.sum(-1), 1.0)
    return (weights * per_head).sum(), (per_head, top1)


def target_ranks(heads: MedusaHeads, lm_head, h: mx.array, targets: mx.array) -> mx.array:
    """Rank of each target among its head's logits (0 = top-1; -1 where no target). (B, K)."""
    logits = head_logits(heads, lm_head, h).astype(mx.float32)  # (K, B, V)
    t = targets.T
    tl = mx.take_along_axis(logits, mx.maximum(t, 0)[..., None], axis=-1)
    rank = (logits > tl).sum(-1)
    return mx.where(t >= 0, rank, -1).T


def evaluate(heads, lm_head, folder: Path, files: list[str], batch_size: int, topk=(1, 5)) -> dict:
    """Per-head top-k accuracies and CE on a split."""
    hits = np.zeros((heads.num_heads, max(topk)))
    counts = np.zeros(heads.num_heads)
    for b in iterate_batches(folder, files, heads.num_heads, batch_size):
        r = target_ranks(heads, lm_head, mx.array(b["hidden"], dtype=mx.float32), mx.array(b["targets"]))
        r = np.array(r)
        for k in range(max(topk)):
            hits[:, k] += ((r >= 0) & (r <= k)).sum(0)
        counts += (r >= 0).sum(0)
    acc = hits / np.maximum(counts, 1)[:, None]
    return {f"top{k}": [round(float(a), 4) for a in acc[:, k - 1]] for k in topk} | {"rows": int(counts[0])}


# --------------------------------------------------------------------------- training


def make_schedule(lr: float, steps: int, warmup: int):
    warmup = min(warmup, max(steps - 1, 0))
    cosine = optim.cosine_decay(lr, max(steps - warmup, 1), end=lr * 0.05)
    if warmup == 0:
        return cosine
    return optim.join_schedules([optim.linear_schedule(lr * 0.01, lr, warmup), cosine], [warmup])


def new_heads(cfg: MedusaConfig, lm_head_weight: mx.array | None, seed: int) -> MedusaHeads:
    mx.random.seed(seed)
    heads = MedusaHeads(cfg)
    if cfg.own_lm_head:  # the reference starts each head's projection from the base lm_head
        for head in heads.heads:
            head.lm_head.weight = mx.array(lm_head_weight)
    mx.eval(heads.parameters())
    return heads


def _save_checkpoint(folder: Path, heads: MedusaHeads, opt, step: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    heads.save(folder)
    mx.save_safetensors(str(folder / "optimizer.safetensors"), dict(tree_flatten(opt.state)))
    (folder / "state.json").write_text(json.dumps({"step": step}))


def steps_per_epoch(meta: dict, batch_size: int) -> int:
    # A sequence's last row has no head target and is dropped by load_shard.
    usable = meta["rows"]["train"] - meta["sequences"]["train"]
    return max(usable // batch_size, 1)


def train(heads: MedusaHeads, lm_head, cache_dir: Path, meta: dict, *, steps: int, batch_size: int, lr: float,
          warmup: int, loss: str = "ce", seed: int = 0, eval_every: int = 0, save_every: int = 0,
          checkpoint: Path | None = None, resume: bool = False, weight_decay: float = 0.0, noise: float = 0.0,
          log=print) -> dict:
    """Train ``heads`` in place on the cached train split; returns the last val metrics (if any).

    ``noise``: Gaussian noise added to the input hidden states, as a fraction of
    their RMS (a regulariser: the heads see each cached state once per epoch).
    """
    train_files = [f["file"] for f in meta["splits"]["train"]]
    val_files = [f["file"] for f in meta["splits"]["val"]]
    if not train_files:
        raise ValueError(f"{cache_dir}: no training rows (all data went to --val-split?)")
    per_epoch = steps_per_epoch(meta, batch_size)
    opt = optim.AdamW(learning_rate=make_schedule(lr, steps, warmup), weight_decay=weight_decay)
    start = 0
    if resume and (checkpoint is None or not (checkpoint / "state.json").is_file()):
        raise FileNotFoundError(f"--resume: no checkpoint in {checkpoint} (it is written every --save-every steps)")
    if resume:
        from .heads_format import read_heads

        weights, _, _ = read_heads(checkpoint)
        heads.load_reference_weights(weights)
        opt.init(heads.trainable_parameters())
        opt.state = tree_unflatten(list(mx.load(str(checkpoint / "optimizer.safetensors")).items()))
        start = json.loads((checkpoint / "state.json").read_text())["step"]
        log(f"resumed from {checkpoint} at step {start}")
    step_fn = nn.value_and_grad(heads, loss_fn)
    mx.random.seed(seed + start)

    def update(b):
        h = mx.array(b["hidden"], dtype=mx.float32)
        if noise > 0:
            rms = mx.sqrt(mx.mean(h * h, axis=-1, keepdims=True))
            h = h + noise * rms * mx.random.normal(h.shape)
        args = [h, mx.array(b["targets"])]
        if loss == "kl":
            args += [mx.array(b["teacher_ids"]), mx.array(b["teacher_probs"])]
        (value, (per_head, top1)), grads = step_fn(heads, lm_head, *args)
        opt.update(heads, grads)
        mx.eval(heads.parameters(), opt.state, value, per_head, top1)
        return float(value), np.array(per_head), np.array(top1)

    metrics: dict = {}
    smooth = None
    bar = tqdm(total=steps, initial=start, desc="train", unit="step")
    step = start
    epoch = start // per_epoch
    while step < steps:
        batches = iterate_batches(cache_dir, train_files, heads.num_heads, batch_size,
                                  np.random.default_rng([seed, epoch]))
        for _ in range(step - epoch * per_epoch):  # resuming mid-epoch: skip what was seen
            next(batches, None)
        for b in batches:
            value, per_head, top1 = update(b)
            smooth = np.stack([per_head, top1]) if smooth is None else 0.9 * smooth + 0.1 * np.stack([per_head, top1])
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", acc="/".join(f"{a:.2f}" for a in smooth[1]),
                            lr=f"{float(opt.learning_rate):.1e}")
            if val_files and eval_every and step % eval_every == 0 and step < steps:
                metrics = evaluate(heads, lm_head, cache_dir, val_files, batch_size)
                bar.write(f"step {step}: val top-1 {metrics['top1']}, top-5 {metrics['top5']}")
            if checkpoint is not None and save_every and step % save_every == 0:
                _save_checkpoint(checkpoint, heads, opt, step)
            if step >= steps or step - epoch * per_epoch >= per_epoch:
                break
        epoch += 1
    bar.close()
    if checkpoint is not None and save_every:
        _save_checkpoint(checkpoint, heads, opt, step)
    metrics = evaluate(heads, lm_head, cache_dir, val_files, batch_size) if val_files else {}
    metrics["train_loss_per_head"] = [round(float(x), 4) for x in smooth[0]] if smooth is not None else None
    metrics["train_top1_per_head"] = [round(float(x), 4) for x in smooth[1]] if smooth is not None else None
    return metrics


# --------------------------------------------------------------------------- CLI


def load_base(model: str | None):
    """The frozen base model (float32 on CPU), its lm_head, tokenizer and id."""
    from mlx_lm.utils import load as mlx_load

    from .default_model import DEFAULT_MODEL_ID, resolve_model_path
    from .model import base_lm_head

    base, tokenizer = mlx_load(str(resolve_model_path(model)))
    if mx.default_device() == mx.cpu:
        base.set_dtype(mx.float32)
    base.freeze()
    return base, base_lm_head(base), tokenizer, model or DEFAULT_MODEL_ID


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx_medusa train", description="Train Medusa heads (Medusa-1: frozen base) in MLX.")
    p.add_argument("--model", default=None, help="Base model folder or repo id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--output", "-o", required=True, help="Folder for the heads (medusa_lm_head.safetensors + config.json)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", default=None, help=f"Prompts to self-distil (JSON list or JSONL; default {DEFAULT_PROMPTS.name})")
    src.add_argument("--data", default=None, help="Text or JSONL file, relabelled with the base model's predictions")
    p.add_argument("--num-prompts", type=int, default=None, help="Use only the first N prompts/documents")
    p.add_argument("--max-tokens", type=int, default=160, help="Response length for self-distillation")
    p.add_argument("--temp", type=float, default=0.0, help="Sampling temperature of the self-distilled responses")
    p.add_argument("--gen-batch-size", type=int, default=32, help="Sequences per batch in the frozen model's pass")
    p.add_argument("--seq-len", type=int, default=512, help="Cut --data documents to this many tokens")
    p.add_argument("--cache-dir", default=None, help="Hidden-state shards (default: OUTPUT/cache); reused when the data matches")
    p.add_argument("--val-split", type=float, default=0.05, help="Fraction of sequences held out for validation")
    p.add_argument("--data-only", action="store_true", help="Build the hidden-state cache and stop")
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=1, help="ResBlocks per head")
    p.add_argument("--layout", choices=["shared", "own"], default="shared",
                   help="shared: heads reuse the base lm_head (small); own: each head has its own")
    p.add_argument("--loss", choices=["ce", "kl"], default="ce", help="CE to the base argmax, or KL to its top-k distribution")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--noise", type=float, default=0.0, help="Gaussian noise on the input states, as a fraction of their RMS")
    p.add_argument("--warmup", type=int, default=None, help="Warm-up steps (default 5%% of the steps)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--iters", type=int, default=None, help="Optimizer steps")
    g.add_argument("--epochs", type=float, default=None, help="Passes over the training rows (default 1)")
    p.add_argument("--batch-size", type=int, default=32, help="Rows (positions) per step")
    p.add_argument("--steps-per-eval", type=int, default=0, help="Validate every N steps (0: at the end only)")
    p.add_argument("--save-every", type=int, default=100, help="Checkpoint every N steps into OUTPUT/checkpoint")
    p.add_argument("--resume", action="store_true", help="Continue from OUTPUT/checkpoint")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def run(args) -> dict:
    for name in ("num_heads", "num_layers", "batch_size", "max_tokens", "gen_batch_size", "seq_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.val_split < 1:
        raise ValueError(f"--val-split {args.val_split} must be in [0, 1)")
    out = Path(args.output)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "cache"
    base, lm_head, tokenizer, model_id = load_base(args.model)
    common = dict(model=model_id, val_split=args.val_split, seed=args.seed)
    if args.data:
        docs = read_documents(args.data, tokenizer, args.seq_len)[: args.num_prompts]
        key = cache_key(data=hashlib.sha256(Path(args.data).read_bytes()).hexdigest(), n=len(docs),
                        seq_len=args.seq_len, **common)
        meta = build_cache(cache_dir, base, lm_head, docs=docs, key=key, val_split=args.val_split,
                           batch_size=args.gen_batch_size, seed=args.seed)
    else:
        prompts = read_prompts(args.prompts or DEFAULT_PROMPTS)[: args.num_prompts]
        key = cache_key(prompts=prompts, max_tokens=args.max_tokens, temp=args.temp, **common)
        meta = build_cache(cache_dir, base, lm_head, prompts=[chat_ids(tokenizer, p) for p in prompts],
                           eos=eos_ids(tokenizer), key=key, val_split=args.val_split, max_tokens=args.max_tokens,
                           batch_size=args.gen_batch_size, temp=args.temp, seed=args.seed)
    print(f"data: {meta['data']}; rows train {meta['rows']['train']}, val {meta['rows']['val']} ({cache_dir})")
    if args.data_only:
        return {}

    per_epoch = steps_per_epoch(meta, args.batch_size)
    steps = args.iters if args.iters is not None else max(int(math.ceil((args.epochs or 1.0) * per_epoch)), 1)
    warmup = args.warmup if args.warmup is not None else max(steps // 20, 1)
    cfg = MedusaConfig(num_heads=args.num_heads, hidden_size=base.args.hidden_size, vocab_size=base.args.vocab_size,
                       num_layers=args.num_layers, own_lm_head=args.layout == "own", base_model=model_id)
    heads = new_heads(cfg, lm_head.weight if args.layout == "own" and hasattr(lm_head, "weight")
                      else base.model.embed_tokens.weight, args.seed)
    tic = time.perf_counter()
    metrics = train(heads, lm_head, cache_dir, meta, steps=steps, batch_size=args.batch_size, lr=args.learning_rate,
                    warmup=warmup, loss=args.loss, seed=args.seed, eval_every=args.steps_per_eval,
                    save_every=args.save_every, checkpoint=out / "checkpoint", resume=args.resume,
                    weight_decay=args.weight_decay, noise=args.noise)
    heads.config.info = {
        "data": meta["data"], "rows": meta["rows"], "sequences": meta["sequences"], "data_seconds": meta["seconds"],
        "steps": steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate, "loss": args.loss,
        "epochs": round(steps / per_epoch, 2), "train_seconds": round(time.perf_counter() - tic, 1),
        "val_top1": metrics.get("top1"), "val_top5": metrics.get("top5"), "val_rows": metrics.get("rows"),
        "train_top1": metrics.get("train_top1_per_head"),
    }
    heads.save(out)
    for i in range(heads.num_heads):
        if "top1" in metrics:
            print(f"head {i}: val top-1 {metrics['top1'][i]:.3f}, top-5 {metrics['top5'][i]:.3f}")
    print(f"saved {heads.num_heads} heads to {out}")
    return metrics


if __name__ == "__main__":
    main()
