"""Where training prompts and documents come from: the shipped prompt files, a user's JSON
or JSONL, text to relabel; normalised-text deduplication, junk filters, and the held-out
and bench prompts kept out of everything trained on (``Excluded``).
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

from ..core.tokens import chat_ids, prompt_ids

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_PROMPTS = DATA_DIR / "train_prompts.json"
HELDOUT_PROMPTS = DATA_DIR / "heldout_prompts.json"
BENCH_PROMPTS = DATA_DIR / "bench_prompts.json"
MIN_PROMPT_CHARS = 12
MAX_PROMPT_CHARS = 400


# --------------------------------------------------------------------------- reading


def read_prompts(path: str | Path) -> list[str]:
    """A JSON list of strings (or of {"prompt": ...}; or {"prompts": [...]}), or JSONL (see read_jsonl_prompts)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found")
    if path.suffix != ".json":
        return read_jsonl_prompts(path)
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"prompt file {path} is not valid JSON: {e}") from None
    if isinstance(items, dict) and isinstance(items.get("prompts"), list):
        items = items["prompts"]  # bench_prompts.json
    if not isinstance(items, list):
        items = [None]
    prompts = [x if isinstance(x, str) else x.get("prompt") if isinstance(x, dict) else None for x in items]
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError(f"prompt file {path} must hold a non-empty list of strings or {{\"prompt\": str}} objects")
    return prompts


def bench_prompts() -> list[dict]:
    """The bench's prompts: dicts with "prompt" and its "category" (``BENCH_PROMPTS``)."""
    return json.loads(BENCH_PROMPTS.read_text(encoding="utf-8"))["prompts"]


def json_lines(path: Path, text: str):
    """(line number, value) of each non-blank line of a JSONL file's ``text``; a line that is not
    JSON is a ``ValueError`` naming ``file:line``."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); write one JSON object a line") from None


def read_jsonl_prompts(path: str | Path) -> list[str]:
    """One prompt a line: a JSON string or an object with a "prompt" string; blank lines skipped.

    A bad line is a ``ValueError`` naming ``file:line`` and what the line needs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found")
    prompts = []
    for n, rec in json_lines(path, path.read_text(encoding="utf-8")):
        text = rec.get("prompt") if isinstance(rec, dict) else rec
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{n}: expected {{\"prompt\": \"...\"}} with a non-empty string")
        prompts.append(text)
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


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
        for n, rec in json_lines(path, text):
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object with 'text', 'messages' or 'prompt'+'completion'")
            if "text" in rec:
                docs.append((tokenizer.encode(rec["text"]), 0))
            elif "messages" in rec:
                docs.append((chat_ids(tokenizer, rec["messages"], add_generation_prompt=False), 0))
            elif "prompt" in rec and "completion" in rec:
                p = prompt_ids(tokenizer, rec["prompt"])
                docs.append((p + tokenizer.encode(rec["completion"], add_special_tokens=False), len(p) - 1))
            else:
                raise ValueError(f"{path}:{n}: expected 'text', 'messages' or 'prompt'+'completion'")
    else:
        docs = [(tokenizer.encode(t.strip()), 0) for t in text.split("\n\n") if t.strip()]
    docs = [(ids[:seq_len], start) for ids, start in docs if start < min(len(ids), seq_len) - 2]
    if not docs:
        raise ValueError(f"{path}: no document has 3 or more tokens to train on")
    return docs


# --------------------------------------------------------------------------- dedup, filters, exclusion


def normalize(text: str) -> str:
    """The text compared for duplicates: case, accents, punctuation and spacing ignored."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


def junk_reason(text: str) -> str | None:
    """Why a written prompt is not worth answering (None if it is): length, language, junk."""
    s = text.strip()
    words = s.split()
    if not MIN_PROMPT_CHARS <= len(s) <= MAX_PROMPT_CHARS or len(words) < 3:
        return "length"
    letters = [c for c in s if c.isalpha()]
    if len(letters) < 0.6 * len(s) or sum(c.isascii() for c in letters) < 0.95 * len(letters):
        return "language"  # mostly symbols or digits, or not in a Latin script
    lower = [w.lower().strip(".,!?:;\"'") for w in words]
    if len(set(lower)) < 0.5 * len(lower) or re.search(r"(.{3,}?)\1{3,}", s):
        return "repetition"
    if re.search(r"https?://|<\||\[/?INST\]|^(user|assistant|system)\b|\b(prompt|topic|task)\s*:", s, re.I):
        return "junk"  # links, chat-template pieces, the writing instruction echoed back
    return None


class Excluded:
    """Prompts that must never be trained on or answered for training (normalised text):
    the held-out prompts (tune, README figures) and the bench prompts."""

    def __init__(self, files=(HELDOUT_PROMPTS, BENCH_PROMPTS)):
        self.keys = {normalize(p) for f in files for p in read_prompts(f)}

    def __contains__(self, prompt: str) -> bool:
        return normalize(prompt) in self.keys


def mix_prompts(sources: list[tuple[str, list[str]]], excluded: Excluded, log=print) -> list[str]:
    """Concatenate (name, prompts) sources in order, dropping excluded prompts and duplicates
    (normalised text; the first occurrence stays); say what was dropped from which source."""
    seen: set[str] = set()
    out = []
    for name, prompts in sources:
        held = dup = 0
        for p in prompts:
            key = normalize(p)
            if p in excluded:
                held += 1
            elif key in seen or not key:
                dup += 1
            else:
                seen.add(key)
                out.append(p)
        if held or dup:
            log(f"prompts from {name}: {len(prompts) - held - dup} kept, {held} held-out/bench dropped, "
                f"{dup} duplicates dropped")
    return out
