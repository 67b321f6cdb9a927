"""Rows per second of self-distillation, one sequence at a time against the continuous batch,
on the same prompts in one run; and whether the batch gives the base model's own rows.

    python scripts/distill_speed.py --num-prompts 8 --max-tokens 32 --batch-size 8

Prints, for each pass, rows/s and rows per CPU-second (all threads' CPU time: steadier
than wall time on a shared machine; with --lanes 2 the wall figure is the one that shows
the second core), how many prompts got token-identical answers, and how far the batched
rows' hidden states and labels are from one plain forward over each prompt and its answer.
``--previous FILE`` also times another version's pass, e.g. the one before issue 23:
``git show 541bb0a:exo_medusa_mlx/distill.py > /tmp/previous_distill.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import exo_medusa_mlx

exo_medusa_mlx.setup_blas()  # before the first import of mlx
from exo_medusa_mlx.training.distill import self_distill
from exo_medusa_mlx.core.tokens import eos_ids, prompt_ids
from exo_medusa_mlx.training.prompts import DEFAULT_PROMPTS, Excluded, mix_prompts, read_prompts
from exo_medusa_mlx.training.data import load_base

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402


def timed(distill, base, lm_head, prompts, eos, max_tokens, batch_size, temp, **kw):
    """({index: Row}, wall seconds, CPU seconds of all the process's threads, rows) of one pass."""
    tic, cpu = time.perf_counter(), time.process_time()
    rows = dict(distill(base, lm_head, prompts, eos, max_tokens, batch_size, temp=temp, **kw))
    return (rows, time.perf_counter() - tic, time.process_time() - cpu,
            sum(len(r.labels) for r in rows.values()))


def forward_gap(base, lm_head, prompt: list[int], row) -> tuple[float, int]:
    """(max |hidden - plain forward's|, labels that differ) of one sequence's rows."""
    ids = prompt + row.nexts[:-1]
    h = base.model(mx.array(ids)[None])[0, len(prompt) - 1 :]  # (n, H): the rows' positions
    labels = np.array(mx.argmax(lm_head(h), axis=-1))
    return float(np.abs(np.array(h) - np.stack(row.hidden)).max()), int((labels != np.array(row.labels)).sum())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", default=None, help="Base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8, help="Sequences of the batched pass")
    p.add_argument("--lanes", type=int, default=2, help="MLX streams of the batched pass (mlx_medusa train --gen-lanes)")
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--previous", default=None, help="Another distill.py whose self_distill to time as well")
    args = p.parse_args(argv)
    base, lm_head, tokenizer, model_id = load_base(args.model)
    texts = mix_prompts([("train prompts", read_prompts(DEFAULT_PROMPTS))], Excluded(), log=lambda *_: None)
    prompts = [prompt_ids(tokenizer, t) for t in texts[: args.num_prompts]]
    eos = eos_ids(tokenizer)
    timed(self_distill, base, lm_head, prompts[:2], eos, 4, 2, 0.0)  # warm-up
    passes = {"sequential (batch 1)": (self_distill, 1, {}),
              f"batched (batch {args.batch_size}, {args.lanes} lanes)": (self_distill, args.batch_size,
                                                                         {"lanes": args.lanes})}
    if args.previous:
        spec = importlib.util.spec_from_file_location("previous_distill", args.previous)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        passes[f"previous {args.previous} (batch {args.batch_size})"] = (old.self_distill, args.batch_size, {})
    print(f"{model_id}: {len(prompts)} prompts, up to {args.max_tokens} tokens, temp {args.temp}")
    results = {}
    for name, (fn, bs, kw) in passes.items():
        rows, seconds, cpu, n = timed(fn, base, lm_head, prompts, eos, args.max_tokens, bs, args.temp, **kw)
        results[name] = rows
        print(f"{name}: {n} rows in {seconds:.2f} s, {n / seconds:.1f} rows/s, {n / cpu:.1f} rows per CPU-second")
    seq, bat = (results[k] for k in list(passes)[:2])
    same = [i for i in seq if seq[i].nexts == bat[i].nexts]
    print(f"answers token-identical, batched vs sequential: {len(same)} of {len(seq)} prompts")
    for i in sorted(set(seq) - set(same)):
        a, b = seq[i].nexts, bat[i].nexts
        k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(f"  prompt {i}: first differs at answer token {k} of {len(a)}/{len(b)}")
    gaps = [forward_gap(base, lm_head, prompts[i], bat[i]) for i in sorted(bat)]
    print(f"batched rows against one plain forward over prompt + answer: max |hidden diff| "
          f"{max(g for g, _ in gaps):.2e}, labels differing {sum(d for _, d in gaps)} of "
          f"{sum(len(r.labels) for r in bat.values())}")


if __name__ == "__main__":
    main()
