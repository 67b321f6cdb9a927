"""``mlx_medusa train --kinds``: the base model writes the texts that prompts of each kind are
made of (first requests and its own answers to them, follow-ups, sentences and its
translations of some, passages and questions over them, word problems, code tasks and its
code), pool by pool, in rounds appended to a folder per pool that a killed run continues.
The prompts are then composed (kinds.py), deduplicated against the training mix and kept
apart from every held-out prompt and passage, and written with a record of the mix.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .hidden_files import write_json
from .kinds import (KIND_SEEDS, Written, code_block, compose_kind, load_kind_seeds, passage_reason,
                    text_key, until_repeat, whole_sentences)
from .prompts import Excluded, junk_reason, normalize
from .self_instruct import EXAMPLES, SEEDS, WRITE_TEMP, accept, chat_writer, clean, grow, load_seeds, model_writer
from .self_instruct import seeds_hash, writing_context

POOLS = ("request", "answer", "followup", "sentence", "translated", "passage", "question", "problem", "code_task",
         "code")
NEEDS = {"chat": ("request", "answer", "followup"), "translation": ("sentence", "translated"),
         "summarization": ("passage",), "qa": ("passage", "question"), "math": ("problem",),
         "code": ("code_task", "code"), "rag": ("passage", "question"), "long": ("passage", "question")}
PARENT = {"answer": "request", "translated": "sentence", "question": "passage", "code": "code_task"}
PASSAGE_KINDS = ("summarization", "qa", "rag", "long")
PASSAGE_TOKENS = 320
PASSAGE_TEMP = 0.7  # passages are sampled: greedy ones on one form and topic would repeat
ANSWER_TOKENS = 160  # the base model's own earlier turn in a chat prompt (greedy, as the decoding measured)
TRANSLATE_TOKENS = 64
CODE_TOKENS = 256
PROMPTS_FILE = "kind_prompts.jsonl"
MIX_FILE = "mix.json"


def pool_sizes(kinds: list[str], n: int) -> dict[str, int]:
    """Texts to write per pool for ``n`` prompts of each kind; a derived pool's size is how many
    of its parent's texts get one (an answer, a translation, a question, code). Questions are
    written over the first ``n`` passages only: each one reads a whole passage first."""
    passages = n if len(set(kinds) & set(PASSAGE_KINDS)) <= 1 else 2 * n
    sizes = {"request": n, "answer": n, "followup": max(n // 2, 1), "sentence": n, "translated": -(-n // 3),
             "passage": passages, "question": n, "problem": n, "code_task": n, "code": -(-n // 2)}
    needed = {p for k in kinds for p in NEEDS[k]}
    return {p: s for p, s in sizes.items() if p in needed}


def model_writers(base, lm_head, tokenizer, batch_size: int, lanes: int = 1) -> SimpleNamespace:
    """The base model as a writer: ``lines`` continues texts to the end of a line,
    ``chat`` answers prompts (see self_instruct)."""
    return SimpleNamespace(lines=model_writer(base, lm_head, tokenizer, batch_size, lanes=lanes),
                           chat=chat_writer(base, lm_head, tokenizer, batch_size, lanes=lanes))


def _list_round(name, spec, topics, writers, rng, batch_size, seen, excluded, dropped) -> list[dict]:
    """A round of a list pool: the base model continues a list (head, examples, a start) per item."""
    starts = [spec["starts"][rng.integers(len(spec["starts"]))].format(topic=topics[rng.integers(len(topics))])
              for _ in range(batch_size)]
    ex = spec["examples"]
    shown = [[ex[i] for i in rng.choice(len(ex), min(EXAMPLES, len(ex)), replace=False)] for _ in starts]
    written = writers.lines([writing_context(e, s, spec["head"] + "\n") for e, s in zip(shown, starts)],
                            int(rng.integers(2**31)))
    return [{"text": t} for t in accept([s + w for s, w in zip(starts, written)], seen, excluded, dropped)]


def _passage_round(seeds, topics, writers, rng, batch_size, seen, excluded, dropped) -> list[dict]:
    asks = [seeds["passage_request"].format(form=seeds["passage_forms"][rng.integers(len(seeds["passage_forms"]))],
                                            topic=topics[rng.integers(len(topics))]) for _ in range(batch_size)]
    out = []
    for ask, text in zip(asks, writers.chat(asks, int(rng.integers(2**31)), PASSAGE_TOKENS, PASSAGE_TEMP)):
        p = until_repeat(whole_sentences(text))
        reason = passage_reason(p, excluded) or ("duplicate" if normalize(p) in seen else None)
        if reason:
            dropped[reason] += 1
            continue
        seen.add(normalize(p))
        out.append({"text": p, "about": ask})
    return out


def _derived_round(name, parents, seeds, writers, rng, dropped) -> list[dict]:
    """A round of a derived pool: one text written from each of ``parents``."""
    seed = int(rng.integers(2**31))
    if name == "question":
        spec = seeds["lists"]["question"]
        starts = [spec["starts"][rng.integers(len(spec["starts"]))] for _ in parents]
        texts = writers.lines([f"{p}\n\n{spec['head']}\n- {s}" for p, s in zip(parents, starts)], seed)
        texts = [clean(s + t) for s, t in zip(starts, texts)]
        texts = [t[: t.index("?") + 1] if "?" in t else "" for t in texts]  # one question, to its mark
    elif name == "translated":
        langs = [seeds["languages"][rng.integers(len(seeds["languages"]))] for _ in parents]
        asks = [f"Translate into {lang}: {p}" for lang, p in zip(langs, parents)]
        texts = [clean(t) for t in writers.chat(asks, seed, TRANSLATE_TOKENS, 0.0)]
        texts = [t if normalize(t) != normalize(p) else "" for t, p in zip(texts, parents)]
    elif name == "answer":
        texts = [whole_sentences(t) for t in writers.chat(parents, seed, ANSWER_TOKENS, 0.0)]
    else:  # code
        texts = [code_block(t) or "" for t in writers.chat(parents, seed, CODE_TOKENS, 0.0)]
    out = []
    for k, (parent, text) in enumerate(zip(parents, texts)):
        reason = "unusable" if not text.strip() else None if name == "code" else junk_reason(
            text, min_chars=12, max_chars=4000 if name == "answer" else 400, unique=0.3,
            ascii_letters=0.75 if name == "translated" else 0.95)  # French, German... are Latin with accents
        if reason:
            dropped[reason] += 1
            continue
        out.append({"text": text, "of": text_key(parent), **({"lang": langs[k]} if name == "translated" else {})})
    return out


def write_pool(name: str, size: int, pools: dict, writers, folder: Path, *, seeds: dict, topics: list[str],
               excluded: Excluded, settings: dict, batch_size: int, seed: int, log=print) -> list[dict]:
    """The ``name`` pool's texts (``size`` of them; for a derived pool, one per each of the first
    ``size`` parent texts that gave a usable one), written in rounds into ``folder/name``."""
    dropped: Counter = Counter()
    settings = {**settings, "pool": name, "batch_size": batch_size, "seed": seed}

    def rng(round_: int):
        return np.random.default_rng([seed, POOLS.index(name), round_])

    if name in PARENT:
        parents = [r["text"] for r in pools[PARENT[name]][:size]]
        records = grow(folder / name, settings, rounds=-(-len(parents) // batch_size), desc=name,
                       produce=lambda r: _derived_round(name, parents[r * batch_size:(r + 1) * batch_size], seeds,
                                                        writers, rng(r), dropped))
    else:
        seen: set[str] = set()

        def recheck(records):  # the exclusions may have grown since they were written
            kept = []
            for r in records:
                key = normalize(r["text"])
                if r["text"] not in excluded and not excluded.overlaps(r["text"]) and key not in seen:
                    seen.add(key)
                    kept.append(r)
            return kept

        def produce(r):
            if name == "passage":
                return _passage_round(seeds, topics, writers, rng(r), batch_size, seen, excluded, dropped)
            return _list_round(name, seeds["lists"][name], topics, writers, rng(r), batch_size, seen, excluded,
                               dropped)

        records = grow(folder / name, settings, produce, count=size, batch_size=batch_size, recheck=recheck,
                       dropped=dropped, desc=name, unit="text")
    why = ", ".join(f"{k} {v}" for k, v in dropped.most_common()) or "none"
    log(f"kinds: {len(records)} {name} texts (wanted {size}); dropped this run: {why}")
    return records


def write_kind_prompts(writers, kinds: list[str], count: int, folder: str | Path, *, model_id: str, seed: int,
                       batch_size: int, excluded: Excluded, seen: set[str], count_tokens,
                       seeds_path: str | Path = KIND_SEEDS, log=print) -> tuple[list, dict]:
    """``count`` prompts of each kind in ``kinds`` (fewer where the written texts run short) and the
    mix record, both also written to ``folder`` (``kind_prompts.jsonl``, ``mix.json``).

    ``writers``: see ``model_writers``; ``seen``: normalised prompts already in the mix (grows);
    ``count_tokens(text)``: the base model's token count, for long prompts.
    """
    seeds = load_kind_seeds(seeds_path)
    topics, _ = load_seeds(SEEDS)
    folder = Path(folder)
    settings = {"model": model_id, "kind_seeds": seeds_hash(seeds_path), "topics": seeds_hash(SEEDS),
                "write_temp": WRITE_TEMP}
    pools: dict[str, list[dict]] = {}
    for name, size in pool_sizes(kinds, count).items():
        pools[name] = write_pool(name, size, pools, writers, folder, seeds=seeds, topics=topics, excluded=excluded,
                                 settings=settings, batch_size=batch_size, seed=seed, log=log)
    written = Written(pools)
    prompts, per_kind, dropped = [], {}, {}
    for kind in kinds:
        got, why = compose_kind(kind, count, written, seeds, seed, count_tokens, excluded, seen)
        prompts += [(kind, p) for p in got]
        per_kind[kind], dropped[kind] = len(got), dict(why)
    record = {"kinds": per_kind, "prompts": len(prompts), "texts": {k: len(v) for k, v in pools.items()},
              "dropped": dropped, "seed": seed, "model": model_id, "kind_seeds": f"{Path(seeds_path).name} "
              f"{settings['kind_seeds']}", "folder": str(folder)}
    _write_lines(folder / PROMPTS_FILE, [{"kind": k, **({"prompt": p} if isinstance(p, str) else {"messages": p})}
                                         for k, p in prompts])
    write_json(folder / MIX_FILE, record)
    log("kinds: " + ", ".join(f"{k} {n}" for k, n in per_kind.items()) + f" prompts ({folder / PROMPTS_FILE})")
    return [p for _, p in prompts], record


def _write_lines(path: Path, records: list[dict]) -> None:
    """A JSONL file replaced whole: a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)

