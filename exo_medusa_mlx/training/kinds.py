"""Prompts of the kinds users bring, composed from texts the base model wrote (kind_data.py):
multi-turn chat with the earlier turns in the prompt, translation, summaries of passages,
questions over a passage, math word problems, code, answers grounded in given documents,
and long prompts of 1-2k tokens. This module holds the kinds, their seeds and templates,
the clean-up of written texts, and the composition, a pure function of what was written.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from .prompts import DATA_DIR, Excluded, junk_reason, normalize, prompt_text

KINDS = ("chat", "translation", "summarization", "qa", "math", "code", "rag", "long")
KIND_SEEDS = DATA_DIR / "kind_seeds.json"
LIST_POOLS = ("request", "followup", "sentence", "problem", "code_task", "question")
LONG_TOKENS = (1000, 2000)  # a long prompt's length, in the base model's tokens
RAG_DOCS = 3  # documents in a RAG context: the one a question was written over, and others
MIN_PASSAGE_WORDS = 60
COMPOSE_TRIES = 3  # draws per wanted prompt before a kind gives up (duplicates, lengths)
# The slots some template of each kind must hold (each tuple met by one template).
_SLOTS = {"translation": [("{text}", "{target}")], "summarization": [("{passage}",)], "qa": [("{passage}", "{question}")],
          "math": [("{problem}",)], "code": [("{task}",), ("{code}",)], "rag": [("{context}", "{question}")],
          "long": [("{passages}",)]}
_FENCE = re.compile(r"```[\w+#.-]*\n(.*?)(\n```|$)", re.S)


# --------------------------------------------------------------------------- kinds and seeds


def parse_kinds(spec: str) -> list[str]:
    """``all`` or a comma list of KINDS (``--kinds``), in KINDS order."""
    names = KINDS if spec.strip() == "all" else [k.strip() for k in spec.split(",") if k.strip()]
    bad = [k for k in names if k not in KINDS]
    if bad or not names:
        raise ValueError(f"--kinds '{spec}': use 'all' or a comma list of {', '.join(KINDS)}")
    return [k for k in KINDS if k in names]


def load_kind_seeds(path: str | Path = KIND_SEEDS) -> dict:
    """The per-kind seeds (languages, passage forms, the lists the model continues, the templates), checked."""
    path = Path(path)
    try:
        seeds = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"kind seeds {path}: unreadable ({e})") from None

    def strings(x, n=1):
        return isinstance(x, list) and len(x) >= n and all(isinstance(s, str) and s.strip() for s in x)

    lists, templates = seeds.get("lists", {}), seeds.get("templates", {})
    problems = [k for k in ("languages", "passage_forms") if not strings(seeds.get(k), 2)]
    if not isinstance(seeds.get("passage_request"), str) or "{form}" not in seeds["passage_request"]:
        problems.append("passage_request (with {form} and {topic})")
    problems += [f"lists.{k}" for k in LIST_POOLS if not isinstance(lists.get(k), dict)
                 or not isinstance(lists[k].get("head"), str) or not strings(lists[k].get("starts"))
                 or not isinstance(lists[k].get("examples"), list)]
    problems += [f"templates.{k}" for k, needs in _SLOTS.items() if not strings(templates.get(k))
                 or not all(any(all(s in t for s in slots) for t in templates[k]) for slots in needs)]
    if problems:
        raise ValueError(f"kind seeds {path}: missing or malformed {', '.join(problems)}")
    return seeds


# --------------------------------------------------------------------------- written texts


def text_key(text: str) -> str:
    """How a text derived from another (an answer, a question over a passage) names it."""
    return hashlib.sha256(normalize(text).encode()).hexdigest()[:12]


def whole_sentences(text: str) -> str:
    """``text`` without a last sentence cut off by the token limit (kept whole if it has no end)."""
    text = re.sub(r"\n{3,}", "\n\n", text.strip())
    ends = [m.end() for m in re.finditer(r"[.!?][\"')\]]?(?=\s|$)", text)]
    return text[: ends[-1]] if ends and ends[-1] < len(text) else text


def until_repeat(text: str) -> str:
    """``text`` up to the first sentence (of 4+ words) it already said: a small model's passage
    often starts going round in circles, and what it wrote before that is still good."""
    seen = set()
    for m in re.finditer(r"[^.!?\n]+[.!?]*", text):
        key = normalize(m.group(0))
        if len(key.split()) > 3 and key in seen:
            return text[: m.start()].rstrip()
        seen.add(key)
    return text


def passage_reason(text: str, excluded: Excluded) -> str | None:
    """Why a written passage cannot be used (None if it can): too short, junk, or held out."""
    if len(text.split()) < MIN_PASSAGE_WORDS:
        return "length"
    sents = [normalize(s) for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) > 3]
    if len(set(sents)) < len(sents):
        return "repetition"
    return junk_reason(text, min_chars=200, max_chars=6000, unique=0.3) or ("held-out" if excluded.overlaps(text)
                                                                             else None)


def code_block(text: str) -> str | None:
    """The first fenced code block of an answer (with its fences), if it has one of 2+ lines; one
    the token limit cut off ends at its last whole line."""
    m = _FENCE.search(text)
    if m is None:
        return None
    code = m.group(1) if m.group(2) else m.group(1)[: m.group(1).rfind("\n")]
    return f"{m.group(0)[: m.start(1) - m.start()]}{code}\n```" if code.count("\n") >= 1 else None


# --------------------------------------------------------------------------- composition


class Written:
    """The written texts by pool (records ``{"text": ..., "of": parent key, ...}``), with
    each derived text findable from its parent (``children``)."""

    def __init__(self, pools: dict[str, list[dict]]):
        self.pools = {k: list(v) for k, v in pools.items()}
        self.children = {k: {r["of"]: r for r in reversed(v)} for k, v in self.pools.items() if v and "of" in v[0]}

    def texts(self, pool: str) -> list[str]:
        return [r["text"] for r in self.pools.get(pool, [])]

    def pairs(self, parent: str, child: str) -> list[tuple[dict, dict]]:
        """(parent, child) records for each parent with a derived text."""
        kids = self.children.get(child, {})
        return [(r, kids[text_key(r["text"])]) for r in self.pools.get(parent, []) if text_key(r["text"]) in kids]


def _docs(rng, passages: list[str]) -> str:
    style = rng.integers(3)
    if style == 0:
        return "\n\n".join(f"[{i + 1}] {p}" for i, p in enumerate(passages))
    if style == 1:
        return "\n\n".join(f"Document {i + 1}:\n{p}" for i, p in enumerate(passages))
    return "\n\n".join(passages)


def _pick(rng, items: list):
    return items[rng.integers(len(items))]


def _fill(template: str, **slots) -> str:
    return template.format(**{k: slots.get(k, "") for k in re.findall(r"{(\w+)}", template)})


def _others(rng, passages: list[str], but: str) -> list[str]:
    return [passages[i] for i in rng.permutation(len(passages)) if passages[i] != but]


def _long(rng, seeds, passages, question, count_tokens) -> str | None:
    """Passages (one holding ``question``'s answer) to between LONG_TOKENS, in a long template."""
    target = rng.integers(LONG_TOKENS[0] + 100, LONG_TOKENS[1] - 200)
    chosen, size = [question[0]["text"]], count_tokens(question[0]["text"])
    for p in _others(rng, passages, chosen[0]):
        if size >= target:
            break
        n = count_tokens(p)
        if size + n < LONG_TOKENS[1] - 150:
            chosen.append(p)
            size += n
    order = rng.permutation(len(chosen))
    text = _fill(_pick(rng, seeds["templates"]["long"]), passages=_docs(rng, [chosen[i] for i in order]),
                 question=question[1]["text"])
    return text if LONG_TOKENS[0] <= count_tokens(text) <= LONG_TOKENS[1] else None


def compose(kind: str, w: Written, seeds: dict, rng, count_tokens) -> str | list[dict] | None:
    """One prompt of ``kind`` drawn with ``rng`` from the written texts; None when they lack what it needs."""
    t = seeds["templates"]
    passages, qs = w.texts("passage"), w.pairs("passage", "question")
    if kind == "chat":
        turns, followups = w.pairs("request", "answer"), w.texts("followup")
        if not turns or not followups:
            return None
        first, answer = _pick(rng, turns)
        return [{"role": "user", "content": first["text"]}, {"role": "assistant", "content": answer["text"]},
                {"role": "user", "content": _pick(rng, followups)}]
    if kind == "translation":
        sources = [(r["text"], "English") for r in w.pools.get("sentence", [])]
        sources += [(r["text"], r["lang"]) for _, r in w.pairs("sentence", "translated")]
        if not sources:
            return None
        text, source = _pick(rng, sources)
        target = _pick(rng, [x for x in ["English", *seeds["languages"]] if x != source])
        return _fill(_pick(rng, t["translation"]), text=text, source=source, target=target)
    if kind == "summarization":
        return _fill(_pick(rng, t["summarization"]), passage=_pick(rng, passages)) if passages else None
    if kind == "math":
        problems = w.texts("problem")
        return _fill(_pick(rng, t["math"]), problem=_pick(rng, problems)) if problems else None
    if kind == "code":
        tasks, code = w.texts("code_task"), w.texts("code")
        with_code = [x for x in t["code"] if "{code}" in x]
        if code and (not tasks or rng.random() < 0.5):
            return _fill(_pick(rng, with_code), code=_pick(rng, code))
        return _fill(_pick(rng, [x for x in t["code"] if "{code}" not in x]), task=_pick(rng, tasks)) if tasks else None
    if not qs:
        return None
    q = _pick(rng, qs)
    if kind == "qa":
        return _fill(_pick(rng, t["qa"]), passage=q[0]["text"], question=q[1]["text"])
    if kind == "rag":
        docs = [q[0]["text"], *_others(rng, passages, q[0]["text"])[: RAG_DOCS - 1]]
        order = rng.permutation(len(docs))
        return _fill(_pick(rng, t["rag"]), context=_docs(rng, [docs[i] for i in order]), question=q[1]["text"])
    if kind == "long":
        return _long(rng, seeds, passages, q, count_tokens)
    raise ValueError(f"unknown kind '{kind}': use one of {', '.join(KINDS)}")


def compose_kind(kind: str, count: int, w: Written, seeds: dict, seed: int, count_tokens, excluded: Excluded,
                 seen: set[str]) -> tuple[list, Counter]:
    """Up to ``count`` distinct prompts of ``kind`` (not held out, not in ``seen``, which grows),
    and what was dropped why."""
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    out, dropped = [], Counter()
    for _ in range(COMPOSE_TRIES * count):
        if len(out) >= count:
            break
        p = compose(kind, w, seeds, rng, count_tokens)
        key = normalize(prompt_text(p)) if p is not None else None
        reason = ("unusable" if p is None else "held-out" if p in excluded or excluded.overlaps(prompt_text(p))
                  else "duplicate" if key in seen else None)
        if reason:
            dropped[reason] += 1
            continue
        seen.add(key)
        out.append(p)
    return out, dropped
