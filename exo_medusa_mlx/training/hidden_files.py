"""Hidden-state files on disk: parts written as sequences finish, a progress file that lets
a killed run resume from its last complete part, and batches of rows read back for training.

A cache folder holds ``{split}-NNNNN.safetensors`` parts, ``progress.json`` while it
is being built and ``meta.json`` once it is finished. Nothing else may be in it. (A part is
a file of rows; a shard is elsewhere a model's layer range, ``engine/shard.py``.)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

PART_ROWS = 8192  # rows per part (a part never splits a sequence)
MIX_PARTS = 4  # parts shuffled together in training
SPLITS = ("train", "val")
_PART = re.compile(r"(train|val)-\d{5}\.safetensors(\.tmp)?")


class Row:
    """One sequence: its rows (hidden state, base argmax, token that follows, base top-k) so far."""

    def __init__(self, index: int):
        self.index = index
        self.hidden, self.labels, self.nexts, self.ids, self.probs = [], [], [], [], []


def write_json(path: Path, obj) -> None:
    """Replace ``path`` whole: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class PartWriter:
    """Buffers sequences and writes ``{split}-NNNNN.safetensors`` parts of about PART_ROWS rows.

    ``files``: the split's parts written so far (by an interrupted run, when resuming);
    ``on_flush`` is called after each part is in place (build_cache records progress).
    """

    def __init__(self, folder: Path, split: str, files: list[dict] | None = None, on_flush=None):
        self.folder, self.split = folder, split
        self.buf: list[Row] = []
        self.files: list[dict] = list(files or [])
        self.on_flush = on_flush

    def add(self, row: Row) -> None:
        if len(row.labels) >= 2:  # one row alone has no head target
            self.buf.append(row)
        if sum(len(r.labels) for r in self.buf) >= PART_ROWS:
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
        tmp = self.folder / (name + ".tmp")
        save_file({
            "hidden": hidden,
            "labels": np.concatenate([r.labels for r in self.buf]).astype(np.int32),
            "next_tokens": np.concatenate([r.nexts for r in self.buf]).astype(np.int32),
            "left": left.astype(np.int32),
            "teacher_ids": np.concatenate([np.stack(r.ids) for r in self.buf]).astype(np.int32),
            "teacher_probs": np.concatenate([np.stack(r.probs) for r in self.buf]).astype(np.float16),
            "sequences": np.array([r.index for r in self.buf], dtype=np.int32),  # what a resumed run skips
        }, str(tmp))
        os.replace(tmp, self.folder / name)
        self.files.append({"file": name, "rows": int(len(left)), "sequences": len(self.buf)})
        self.buf = []
        if self.on_flush is not None:
            self.on_flush()


def part_files(folder: Path) -> list[Path]:
    """Parts (and half-written parts) in ``folder``."""
    return sorted(f for f in folder.iterdir() if _PART.fullmatch(f.name)) if folder.is_dir() else []


def check_folder(folder: Path) -> None:
    """Refuse a cache folder that holds anything but a cache: it may be a model folder."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cache folder {folder} is a file: pass a folder to --cache-dir")
    ours = set(part_files(folder)) | {folder / (n + t) for n in ("meta.json", "progress.json") for t in ("", ".tmp")}
    others = sorted(set(folder.iterdir()) - ours) if folder.is_dir() else []
    if others:
        raise ValueError(f"cache folder {folder} holds files that are not a hidden-state cache ({others[0].name}): "
                         "pass an empty or new folder to --cache-dir")


def done_sequences(folder: Path, files: list[dict]) -> set[int]:
    """Sequence indices stored in the given parts."""
    from safetensors import safe_open

    done: set[int] = set()
    for f in files:
        with safe_open(str(folder / f["file"]), framework="numpy") as s:
            done.update(s.get_tensor("sequences").tolist())
    return done


def load_part(path: Path, num_heads: int) -> dict[str, np.ndarray]:
    """Rows of one part with per-head targets, (rows, K); rows without any target dropped."""
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
    """Batches of rows; shuffled across MIX_PARTS parts at a time when ``rng`` is given."""
    order = rng.permutation(len(files)) if rng is not None else np.arange(len(files))
    carry = None
    for g in range(0, len(order), MIX_PARTS if rng is not None else 1):
        parts = [load_part(folder / files[i], num_heads) for i in order[g : g + (MIX_PARTS if rng is not None else 1)]]
        if carry is not None:
            parts.insert(0, carry)
        data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        n = len(data["targets"])
        perm = rng.permutation(n) if rng is not None else np.arange(n)
        full = n - n % batch_size if rng is not None else n
        for s in range(0, full, batch_size):
            yield {k: v[perm[s : s + batch_size]] for k, v in data.items()}
        carry = {k: v[perm[full:]] for k, v in data.items()} if full < n else None
