"""Prompts at scale without a network (self-instruct): the base model writes new prompts
by continuing a list of training prompts from a seed start ("Write a short poem about
{topic}", "How can I", ...) and topic, in batches. A small model completes a list far
better than it follows an instruction to write one. What it writes is cleaned, filtered
(length, language, junk), deduplicated by normalised text, kept apart from the held-out
and bench prompts, and appended to a file as each batch finishes, so a killed run
continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..core.tokens import eos_ids, prompt_ids
from .prompts import DATA_DIR, Excluded, junk_reason, normalize
from .hidden_files import write_json

SEEDS = DATA_DIR / "self_instruct_seeds.json"
EXAMPLES = 4  # training prompts shown before each written one
WRITE_MAX_TOKENS = 40
WRITE_TEMP = 0.9
MAX_ROUNDS_FACTOR = 4  # give up after this many times the rounds the count needs (filters dropping most)
RECORDS = "prompts.jsonl"  # what a folder of written prompts (or other written texts) holds, one JSON a line
LIST_HEAD = "Requests that users typed to an AI assistant:\n"
_LEAD = re.compile(r"^\s*(?:[-*•]|\d+[.)]|(?:new\s+)?(?:request|question|prompt|task|instruction)\s*:)\s*", re.I)


def load_seeds(path: str | Path = SEEDS) -> tuple[list[str], list[str]]:
    """(topics, starts) from a seeds file; a start may hold a ``{topic}`` slot."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"self-instruct seeds {path}: unreadable ({e})") from None
    topics, starts = d.get("topics"), d.get("starts")
    if not all(isinstance(x, list) and x and all(isinstance(s, str) and s.strip() for s in x) for x in (topics, starts)):
        raise ValueError(f"self-instruct seeds {path}: need non-empty 'topics' and 'starts' lists of strings")
    return topics, starts


def writing_context(examples: list[str], start: str, head: str = LIST_HEAD) -> str:
    """The text the base model continues: a list of example prompts, then the new one's start."""
    return head + "".join(f"- {e}\n" for e in examples) + f"- {start}"


def clean(text: str) -> str:
    """The first line of a written prompt, without quotes or list marks."""
    line = next((l for l in text.strip().splitlines() if l.strip()), "")
    return _LEAD.sub("", line).strip().strip("\"'“”").strip()


def accept(texts: list[str], seen: set[str], excluded: Excluded, dropped: Counter) -> list[str]:
    """Written prompts worth answering: clean, not junk, not held out, not seen (``seen`` grows)."""
    kept = []
    for t in texts:
        p = clean(t)
        reason = junk_reason(p) or ("held-out" if p in excluded else "duplicate" if normalize(p) in seen else None)
        if reason:
            dropped[reason] += 1
            continue
        seen.add(normalize(p))
        kept.append(p)
    return kept


def model_writer(base, lm_head, tokenizer, batch_size: int, temp: float = WRITE_TEMP, lanes: int = 1):
    """``write(contexts, seed) -> continuations``: the base model's sampled continuation of each
    text (plain text, no chat template) up to the end of its line, in one continuous batch."""
    from .distill import self_distill

    vocab = getattr(tokenizer, "vocab", None) or {}
    stops = eos_ids(tokenizer) | {i for i in vocab.values() if "\n" in tokenizer.decode([i])}

    def write(contexts: list[str], seed: int) -> list[str]:
        ids = [tokenizer.encode(c) for c in contexts]
        out = dict(self_distill(base, lm_head, ids, stops, WRITE_MAX_TOKENS, batch_size, temp=temp, seed=seed,
                                states=False, lanes=lanes))
        return [tokenizer.decode([t for t in out[i].nexts if t not in stops]) for i in range(len(ids))]

    return write


def chat_writer(base, lm_head, tokenizer, batch_size: int, lanes: int = 1):
    """``answer(prompts, seed, max_tokens, temp) -> texts``: the base model's chat answers
    (chat template; greedy at temp 0), in one continuous batch, end of turn dropped."""
    from .distill import self_distill

    eos = eos_ids(tokenizer)

    def answer(prompts: list, seed: int, max_tokens: int, temp: float) -> list[str]:
        ids = [prompt_ids(tokenizer, p) for p in prompts]
        out = dict(self_distill(base, lm_head, ids, eos, max_tokens, batch_size, temp=temp, seed=seed,
                                states=False, lanes=lanes))
        return [tokenizer.decode([t for t in out[i].nexts if t not in eos]) for i in range(len(ids))]

    return answer


def seeds_hash(path: str | Path) -> str:
    """A seeds file's content hash, recorded with what was written from it (a changed file is another run)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def write_prompts(write, count: int, folder: str | Path, *, examples: list[str], seen: set[str],
                  excluded: Excluded, settings: dict, batch_size: int, seed: int = 0,
                  seeds: str | Path = SEEDS, log=print) -> list[str]:
    """``count`` new prompts: seed starts continued by ``write`` (see ``model_writer``), saved in ``folder``.

    Each round asks for ``batch_size`` prompts, one per (start, topic, examples) drawn
    with (seed, round); the kept ones are appended to ``folder/prompts.jsonl``. A
    folder written with other settings is refused; the same settings continue it.
    ``seen``: normalised prompts already in the mix (grows).
    """
    topics, starts_ = load_seeds(seeds)
    if not examples:
        raise ValueError("self-instruct needs training prompts to show as examples")
    folder = Path(folder)
    settings = {**settings, "seed": seed, "batch_size": batch_size, "max_tokens": WRITE_MAX_TOKENS,
                "seeds": seeds_hash(seeds),
                "examples": hashlib.sha256(json.dumps(examples).encode()).hexdigest()[:16]}
    dropped: Counter = Counter()

    def produce(round_: int) -> list[dict]:
        rng = np.random.default_rng([seed, round_])
        starts = [starts_[rng.integers(len(starts_))].format(topic=topics[rng.integers(len(topics))])
                  for _ in range(batch_size)]
        shown = [[examples[i] for i in rng.choice(len(examples), min(EXAMPLES, len(examples)), replace=False)]
                 for _ in range(batch_size)]
        written = write([writing_context(e, s) for e, s in zip(shown, starts)], int(rng.integers(2**31)))
        return [{"prompt": p} for p in accept([s + w for s, w in zip(starts, written)], seen, excluded, dropped)]

    def recheck(records: list[dict]) -> list[dict]:  # the exclusions may have grown since they were written
        return [{"prompt": p} for p in accept([r["prompt"] for r in records], seen, excluded, Counter())]

    kept = grow(folder, settings, produce, count=count, batch_size=batch_size, recheck=recheck, dropped=dropped,
                desc="self-instruct", unit="prompt")
    why = ", ".join(f"{k} {v}" for k, v in dropped.most_common()) or "none"
    log(f"self-instruct: {len(kept)} of {count} prompts ({folder / RECORDS}); dropped: {why}")
    return [r["prompt"] for r in kept]


def grow(folder: Path, settings: dict, produce, *, count: int | None = None, rounds: int | None = None,
         batch_size: int = 1, recheck=None, dropped: Counter | None = None, desc: str = "write",
         unit: str = "item") -> list[dict]:
    """Records appended to ``folder/records.jsonl`` in rounds, resumable: ``produce(round)`` gives
    a round's kept records (drawn from ``round`` alone, so a rerun continues where a kill stopped).

    Runs until ``count`` records are kept (giving up after MAX_ROUNDS_FACTOR times the rounds
    that needs, when filters drop most), or until ``rounds`` rounds are done. ``recheck``
    filters the records a previous run kept. A folder of other ``settings`` is refused.
    """
    state = _open(folder, settings)
    records = _read(folder)
    records = recheck(records) if recheck else records
    if rounds is None:
        rounds = state["rounds"] + MAX_ROUNDS_FACTOR * (-(-max(count - len(records), 0) // batch_size)) + 1
    total = count if count is not None else rounds
    bar = tqdm(total=total, initial=min(len(records) if count is not None else state["rounds"], total), desc=desc,
               unit=unit if count is not None else "round")
    while state["rounds"] < rounds and (count is None or len(records) < count):
        new = produce(state["rounds"])
        with open(folder / RECORDS, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in new)
        state["rounds"] += 1
        write_json(folder / "settings.json", state)
        records += new
        bar.update(min(len(new), max(total - bar.n, 0)) if count is not None else 1)
        if dropped is not None:
            bar.set_postfix(kept=len(records), dropped=sum(dropped.values()), refresh=False)
    bar.close()
    return records[:count]


def _open(folder: Path, settings: dict) -> dict:
    path = folder / "settings.json"
    if path.is_file():
        state = json.loads(path.read_text())
        if state.get("settings") != settings:
            raise ValueError(f"{folder} holds prompts written with other settings "
                             f"({state.get('settings')}): pass another folder, or delete {folder}")
        return state
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{folder} is not a folder of written prompts (no settings.json): pass another folder")
    folder.mkdir(parents=True, exist_ok=True)
    state = {"settings": settings, "rounds": 0}
    write_json(path, state)
    return state


def _read(folder: Path) -> list[dict]:
    path = folder / RECORDS
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):  # a line cut by a kill mid-write: drop it before appending more
        text = text[: text.rfind("\n") + 1]
        path.write_text(text, encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]
