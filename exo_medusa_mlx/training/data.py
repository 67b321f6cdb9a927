"""The data half of ``mlx_medusa train``: the prompts (the prompt file, the user's JSONL,
prompts the base model writes itself, per task kind too; never the held-out or bench prompts) or documents,
and the cache of the frozen model's hidden states over them (state_cache.build_cache).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..core.tokens import eos_ids, prompt_ids
from .state_cache import build_cache, cache_key
from .hidden_files import write_json
from .kind_data import MIX_FILE, model_writers, write_kind_prompts
from .kinds import load_kind_seeds, parse_kinds
from .prompts import (DEFAULT_PROMPTS, Excluded, mix_prompts, normalize, prompt_text, read_documents,
                      read_jsonl_prompts, read_prompts)
from .self_instruct import SEEDS, WRITE_TEMP, load_seeds, model_writer, write_prompts


def load_base(model: str | None):
    """The frozen base model (float32 on CPU), its lm_head, tokenizer and id."""
    from mlx_lm.utils import load as mlx_load

    from ..default_model import DEFAULT_MODEL_ID, resolve_model_path
    from ..loading import resolve_dtype
    from ..model import base_lm_head

    base, tokenizer = mlx_load(str(resolve_model_path(model)))
    dtype = resolve_dtype(None)
    if dtype is not None:
        base.set_dtype(dtype)
    base.freeze()
    return base, base_lm_head(base), tokenizer, model or DEFAULT_MODEL_ID


def prompt_sources(opts) -> list[tuple[str, list[str]]]:
    """(name, prompts) of the prompt file and each --add-prompts file, read now: a bad line
    fails before the model loads. Empty with --data."""
    if opts.data:
        return []
    if opts.self_instruct:
        load_seeds(opts.self_instruct_seeds or SEEDS)
    if opts.kinds:
        load_kind_seeds()
    path = Path(opts.prompts or DEFAULT_PROMPTS)
    sources = [(f"--prompts {path.name}" if opts.prompts else path.name, read_prompts(path))]
    return sources + [(f"--add-prompts {p}", read_jsonl_prompts(p)) for p in opts.add_prompts]


def training_prompts(opts, sources, base, lm_head, tokenizer, model_id: str, out: Path,
                     log=print) -> tuple[list, dict]:
    """The prompts to answer and the record of their mix: the sources mixed (deduplicated,
    held-out and bench prompts dropped), the first --num-prompts of them, then --self-instruct
    prompts and --kinds prompts written by the base model (kept in their folders, continued
    by a rerun)."""
    excluded = Excluded()
    kept: dict[str, int] = {}
    mixed = mix_prompts(sources, excluded, log, kept)[: opts.num_prompts]
    if not mixed:
        raise ValueError("no training prompts left after dropping held-out and duplicate ones: add prompts")
    mix: dict = {"sources": {**kept, "first": len(mixed)} if opts.num_prompts is not None else kept}
    seen = {normalize(prompt_text(p)) for p in mixed}
    if opts.self_instruct:
        write = model_writer(base, lm_head, tokenizer, opts.gen_batch_size, lanes=opts.gen_lanes)
        written = write_prompts(
            write, opts.self_instruct, Path(opts.self_instruct_dir or out / "self_instruct"), examples=mixed,
            seen=seen, excluded=excluded, settings={"model": model_id, "temp": WRITE_TEMP},
            batch_size=opts.gen_batch_size, seed=opts.seed, seeds=opts.self_instruct_seeds or SEEDS, log=log)
        mixed, mix["sources"]["self-instruct"] = mixed + written, len(written)
    if opts.kinds:
        written, mix["kind_prompts"] = write_kind_prompts(
            model_writers(base, lm_head, tokenizer, opts.gen_batch_size, lanes=opts.gen_lanes),
            parse_kinds(opts.kinds), opts.kind_prompts, Path(opts.kinds_dir or out / "kinds"), model_id=model_id,
            seed=opts.seed, batch_size=opts.gen_batch_size, excluded=excluded, seen=seen,
            count_tokens=lambda text: len(tokenizer.encode(text)), log=log)
        mixed, mix["sources"]["kinds"] = mixed + written, len(written)
    mix["prompts"] = len(mixed)
    return mixed, mix


def build_data(opts, sources, base, lm_head, tokenizer, model_id: str, out: Path, cache_dir: Path,
               log=print) -> dict:
    """The hidden-state cache of the frozen model over the run's data (reused or resumed when
    the same data was cached before); returns its meta."""
    common = dict(model=model_id, val_split=opts.val_split, seed=opts.seed)
    if opts.data:
        docs = read_documents(opts.data, tokenizer, opts.seq_len)[: opts.num_prompts]
        key = cache_key(data=hashlib.sha256(Path(opts.data).read_bytes()).hexdigest(), n=len(docs),
                        seq_len=opts.seq_len, **common)
        return build_cache(cache_dir, base, lm_head, docs=docs, key=key, val_split=opts.val_split,
                           batch_size=opts.gen_batch_size, seed=opts.seed, log=log)
    prompts, mix = training_prompts(opts, sources, base, lm_head, tokenizer, model_id, out, log)
    write_json(out / MIX_FILE, mix)
    extra = {"samples": opts.samples_per_prompt} if opts.samples_per_prompt != 1 else {}
    key = cache_key(prompts=prompts, max_tokens=opts.max_tokens, temp=opts.temp, **extra, **common)
    meta = build_cache(cache_dir, base, lm_head, prompts=[prompt_ids(tokenizer, p) for p in prompts],
                       eos=eos_ids(tokenizer), key=key, val_split=opts.val_split, max_tokens=opts.max_tokens,
                       batch_size=opts.gen_batch_size, temp=opts.temp, seed=opts.seed,
                       samples=opts.samples_per_prompt, lanes=opts.gen_lanes, log=log)
    return {**meta, "mix": mix}
