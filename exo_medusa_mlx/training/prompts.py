"""Where training prompts and documents come from: the shipped prompt files, a user's JSON
or JSONL, text to relabel; normalised-text deduplication, junk filters, and the held-out
and bench prompts kept out of everything trained on (``Excluded``).

A prompt is a string (one user message) or a list of chat messages (``{"role", "content"}``
dicts: a conversation whose last message is the user's).
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
HELDOUT_KINDS = DATA_DIR / "heldout_kinds.json"
BENCH_PROMPTS = DATA_DIR / "bench_prompts.json"
MIN_PROMPT_CHARS = 12
MAX_PROMPT_CHARS = 400
MIN_SHARED_WORDS = 8  # a held-out sentence this long found inside a text means the text holds its passage
ROLES = ("system", "user", "assistant")


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


def read_jsonl_prompts(path: str | Path) -> list:
    """One prompt a line: a JSON string, an object with a "prompt" string, or one with
    "messages" (a chat prompt); blank lines skipped.

    A bad line is a ``ValueError`` naming ``file:line`` and what the line needs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found")
    prompts = []
    for n, rec in json_lines(path, path.read_text(encoding="utf-8")):
        if isinstance(rec, dict) and "messages" in rec:
            prompts.append(check_messages(rec["messages"], f"{path}:{n}"))
            continue
        text = rec.get("prompt") if isinstance(rec, dict) else rec
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{n}: expected {{\"prompt\": \"...\"}} with a non-empty string")
        prompts.append(text)
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def as_messages(prompt: str | list[dict]) -> list[dict]:
    """A prompt as chat messages (a string is one user message)."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def prompt_text(prompt: str | list[dict]) -> str:
    """A prompt's words (every message's content), for deduplication and exclusion."""
    return prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in prompt)


def check_messages(messages, where: str) -> list[dict]:
    """``messages`` if it is a conversation ending with the user's turn, else a ``ValueError`` naming ``where``."""
    if (not isinstance(messages, list) or not messages
            or any(not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str)
                   or not m["content"].strip() for m in messages) or messages[-1]["role"] != "user"):
        raise ValueError(f"{where}: a chat prompt is a list of {{\"role\": \"user\"|\"assistant\"|\"system\", "
                         "\"content\": \"...\"}} messages ending with the user's")
    return messages


def read_kind_prompts(path: str | Path = HELDOUT_KINDS) -> dict[str, list]:
    """{kind: prompts} of a per-kind prompt file: ``{"kinds": {kind: [prompt, ...]}}``, each
    prompt a string or a list of chat messages."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"per-kind prompt file {path} not found")
    try:
        kinds = json.loads(path.read_text(encoding="utf-8")).get("kinds")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"per-kind prompt file {path} is not a JSON object with 'kinds' ({e})") from None
    if not isinstance(kinds, dict) or not kinds or not all(isinstance(v, list) and v for v in kinds.values()):
        raise ValueError(f"per-kind prompt file {path}: 'kinds' must map each kind to a non-empty list of prompts")
    for kind, prompts in kinds.items():
        for n, p in enumerate(prompts):
            if not isinstance(p, str):
                check_messages(p, f"{path}: {kind} prompt {n}")
            elif not p.strip():
                raise ValueError(f"{path}: {kind} prompt {n} is empty")
    return kinds


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


def junk_reason(text: str, min_chars: int = MIN_PROMPT_CHARS, max_chars: int = MAX_PROMPT_CHARS,
                unique: float = 0.5, ascii_letters: float = 0.95) -> str | None:
    """Why a written prompt (or a longer text, with other bounds) is not worth answering (None
    if it is): length, language (fewer than ``ascii_letters`` of its letters ASCII), repetition
    (fewer than ``unique`` of its words distinct), junk."""
    s = text.strip()
    words = s.split()
    if not min_chars <= len(s) <= max_chars or len(words) < 3:
        return "length"
    letters = [c for c in s if c.isalpha()]
    if len(letters) < 0.6 * len(s) or sum(c.isascii() for c in letters) < ascii_letters * len(letters):
        return "language"  # mostly symbols or digits, or not in a Latin script
    lower = [w.lower().strip(".,!?:;\"'") for w in words]
    if len(set(lower)) < unique * len(lower) or re.search(r"(.{3,}?)\1{3,}", s):
        return "repetition"
    if re.search(r"https?://|<\||\[/?INST\]|^(user|assistant|system)\b|\b(prompt|topic|task)\s*:", s, re.I):
        return "junk"  # links, chat-template pieces, the writing instruction echoed back
    return None


def sentences(text: str, min_words: int = MIN_SHARED_WORDS) -> set[str]:
    """The normalised sentences of ``text`` with at least ``min_words`` words."""
    parts = (normalize(s) for s in re.split(r"(?<=[.!?])\s+|\n+", text))
    return {s for s in parts if len(s.split()) >= min_words}


class Excluded:
    """Prompts that must never be trained on or answered for training (normalised text):
    the held-out prompts (tune, README figures), the per-kind held-out prompts and the
    bench prompts; and the sentences of the per-kind ones' passages (``overlaps``)."""

    def __init__(self, files=(HELDOUT_PROMPTS, BENCH_PROMPTS), kinds: str | Path | None = HELDOUT_KINDS):
        held = [p for f in files for p in read_prompts(f)]
        if kinds is not None:
            held += [p for prompts in read_kind_prompts(kinds).values() for p in prompts]
        self.keys = {normalize(prompt_text(p)) for p in held}
        self.passages = set().union(*(sentences(prompt_text(p)) for p in held)) if held else set()

    def __contains__(self, prompt: str | list[dict]) -> bool:
        return normalize(prompt_text(prompt)) in self.keys

    def overlaps(self, text: str) -> bool:
        """Whether ``text`` holds a long sentence of a held-out prompt (its passage, say)."""
        return not self.passages.isdisjoint(sentences(text))


def mix_prompts(sources: list[tuple[str, list]], excluded: Excluded, log=print,
                kept: dict[str, int] | None = None) -> list:
    """Concatenate (name, prompts) sources in order, dropping excluded prompts and duplicates
    (normalised text; the first occurrence stays); say what was dropped from which source.
    ``kept`` (if given) receives the prompts kept per source."""
    seen: set[str] = set()
    out = []
    for name, prompts in sources:
        held = dup = 0
        for p in prompts:
            key = normalize(prompt_text(p))
            if p in excluded:
                held += 1
            elif key in seen or not key:
                dup += 1
            else:
                seen.add(key)
                out.append(p)
        if kept is not None:
            kept[name] = len(prompts) - held - dup
        if held or dup:
            log(f"prompts from {name}: {len(prompts) - held - dup} kept, {held} held-out/bench dropped, "
                f"{dup} duplicates dropped")
    return out
