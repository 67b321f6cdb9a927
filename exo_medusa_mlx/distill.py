"""Data for Medusa head training: the base model's own responses (self-distillation)
or a text/JSONL file relabelled with its predictions, run once through the frozen
model into hidden-state shards on disk (``build_cache``), and read back in batches.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import deque
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm.auto import tqdm

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_PROMPTS = DATA_DIR / "train_prompts.json"
SHARD_ROWS = 8192  # rows per shard (a shard never splits a sequence)
TEACHER_TOPK = 8  # base-model top-k probabilities kept per row, for --loss kl
MIX_SHARDS = 4  # shards shuffled together in training
CACHE_VERSION = 2  # 2: shards hold the token fed after each row ("next_tokens")



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
    """One sequence: its rows (hidden state, base argmax, token that follows, base top-k) so far."""

    def __init__(self, index: int):
        self.index = index
        self.hidden, self.labels, self.nexts, self.ids, self.probs = [], [], [], [], []


def self_distill(base, lm_head, prompts: list[list[int]], eos: set[int], max_tokens: int, batch_size: int,
                 temp: float = 0.0, seed: int = 0, progress=None, greedy: set[int] | None = None):
    """Generate the base model's responses in a continuous batch; yield (index, row) per finished prompt.

    Responses are sampled at ``temp`` (greedy at 0), except those of the prompt
    indices in ``greedy``, which are always greedy. The labels are always the base
    model's argmax, so a sampled response still teaches what greedy decoding
    would say next from there.

    A sequence's rows are the last prompt position and every response token but
    the last, each with the hidden state there and the base model's argmax (the
    next token, when greedy). Finished sequences leave the batch (``filter``);
    new prompts join it (``extend``) once it is half empty, as mlx-lm's
    BatchGenerator does, but here the hidden states are kept. ``progress(n)`` is
    told the rows each step makes.
    """
    from mlx_lm.models.cache import BatchKVCache

    mx.random.seed(seed)
    greedy = greedy or set()
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
            sampled = mx.array([temp > 0 and r.index not in greedy for r in active])
        else:
            h = base.model(y[:, None], cache=cache)[:, 0]  # (B, H) at the fed tokens
            rows = active
        logits = lm_head(h)
        label, ids, probs = _teacher(logits)
        tok = label if temp == 0 else mx.where(sampled[-len(rows):], mx.random.categorical(logits / temp, axis=-1), label)
        y = tok if rows is active or y is None else mx.concatenate([y, tok])
        mx.eval(h, y, label, ids, probs)
        h_np, tok_np, lab, ids_np, pr = (np.array(a) for a in (h, tok, label, ids, probs))
        if progress is not None:
            progress(len(rows))
        for j, row in enumerate(rows):
            row.hidden.append(h_np[j])
            row.labels.append(int(lab[j]))
            row.nexts.append(int(tok_np[j]))
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
                y, sampled = y[k], sampled[k]
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
            row.nexts = list(ids[start + 1 :]) + row.labels[-1:]  # the text's next token (the last has none)
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
            "next_tokens": np.concatenate([r.nexts for r in self.buf]).astype(np.int32),
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
                seed: int = 0, samples: int = 1) -> dict:
    """Run the frozen model once over the data and write shards to ``folder``; reuse them if ``key`` matches.

    ``prompts`` (token ids, chat template applied) are self-distilled, stopping at
    ``eos``; ``docs`` (ids, first trained position) are relabelled. A ``val_split``
    fraction of the sequences, drawn with ``seed``, goes to the val split. With
    ``samples`` > 1 each prompt is answered that many times, greedily first and
    then sampled at ``temp``; the split is drawn by prompt, so no val prompt is
    trained on. Returns the cache's meta.
    """
    if samples < 1 or (samples > 1 and (prompts is None or temp <= 0)):
        raise ValueError(f"samples per prompt {samples}: must be 1, or more with prompts and a temperature > 0")
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            return meta
        # A finished cache of other data (or another seed, split, length): hours of work, never overwritten.
        raise ValueError(f"{folder} holds hidden states of other data ({meta.get('data', '?')}; or another "
                         "--seed, --val-split or --max-tokens, or an older cache format): pass another "
                         "--cache-dir, or delete that folder")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cache folder {folder} is a file: pass a folder to --cache-dir")
    ours = [f for split in ("train", "val") for f in folder.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9].safetensors")]
    others = sorted(set(folder.iterdir()) - set(ours)) if folder.is_dir() else []
    if others:
        raise ValueError(f"cache folder {folder} holds files that are not a hidden-state cache ({others[0].name}): "
                         "pass an empty or new folder to --cache-dir")
    folder.mkdir(parents=True, exist_ok=True)
    # No meta.json (written last): shards left by an interrupted run, incomplete, so cleared.
    for f in ours:
        f.unlink()
    n = len(prompts) if prompts is not None else len(docs)
    n_val = max(int(round(val_split * n)), 1 if n > 1 else 0) if val_split > 0 else 0
    val = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    if samples > 1:
        val = {i + j * n for i in val for j in range(samples)}
        prompts = prompts * samples
    writers = {"train": ShardWriter(folder, "train"), "val": ShardWriter(folder, "val")}
    tic = time.perf_counter()
    made = [0]

    def progress(n):
        made[0] += n
        bar.set_postfix(rows=made[0], rows_per_s=f"{made[0] / (time.perf_counter() - tic):.0f}", refresh=False)

    if prompts is not None:
        stream = self_distill(base, lm_head, prompts, eos or set(), max_tokens, batch_size, temp, seed, progress,
                              greedy=set(range(n)) if samples > 1 else None)
        unit, what = "response", f"self-distilled: {n} prompts, max {max_tokens} tokens, temp {temp}"
        if samples > 1:
            what += f", {samples} responses each (the first greedy)"
            n *= samples
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
        "next": d["next_tokens"][keep],  # the token fed after the row: what next-token heads read
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
