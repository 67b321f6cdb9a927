"""``mlx_medusa bench --concurrency 1,2,4,8,16``: many requests decoded at once, in one run.

At each concurrency level C, C requests arrive all at once (each its own bench prompt,
the prompts cycled, the same ``--max-tokens``, greedy) and each method decodes them
together, the methods back to back:

  MLX    mlx_lm   mlx-lm's own ``BatchGenerator``
         plain    ours, plain batched (``BatchGenerator`` with root-only trees)
         medusa   ours, Medusa batched (trees shrinking as the batch fills: ``core.budget``)
  torch  hf       transformers' batched greedy ``generate`` (left padding)
         plain    ours, plain batched, on torch
         medusa   ours, Medusa batched, on torch

Per method and level: total tokens/s (every request's tokens over the wall time from
their arrival to the last token, prefill included), each request's latency (arrival to
its last token: p50, p95), whether each request's tokens equal that request decoded alone
(ours, plain, one request at a time), and the roofline: rows verified per step, step time,
and the fraction of this CPU's matmul peak (``bench.roofline``, the peak measured in the run).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cli_args import fail, positive_int, positive_ints
from ..training.prompts import bench_prompts
from .measure import machine, save_figure, step_clock, tree_facts, write_results
from .roofline import matmul_peak, roofline

DEFAULT_LEVELS = (1, 2, 4, 8, 16)
METHODS = {"mlx": {"mlx_lm": "mlx-lm BatchGenerator", "plain": "ours plain batched", "medusa": "ours Medusa batched"},
           "torch": {"hf": "transformers generate, batched", "plain": "ours plain batched (torch)",
                     "medusa": "ours Medusa batched (torch)"}}


@dataclass
class Run:
    """One method's decoding of one level's requests."""

    tokens: list[list[int]]  # per request, EOS dropped
    latency: list[float]  # per request: seconds from arrival to its last token
    wall: float  # arrival to the last token of all
    steps: int  # decoding steps (batched forwards)
    rows: int  # tokens verified over all steps
    step_seconds: float  # time in those steps


def _ours(model, tokenizer, prompts: list, max_tokens: int, medusa: bool, budget) -> Run:
    from ..core.batch_generation import BatchGenerator
    from ..core.tokens import eos_ids

    eos = eos_ids(tokenizer, model.eos_token_ids)
    gen = BatchGenerator(model, tokenizer, completion_batch_size=len(prompts), medusa=medusa)
    gen.tree_for = budget.tree_for if medusa else None
    t0 = time.perf_counter()
    uids = gen.insert(prompts, [max_tokens] * len(prompts))
    toks, done = {u: [] for u in uids}, {}
    while responses := gen.next():
        now = time.perf_counter() - t0
        for r in responses:
            if not (r.finish_reason == "stop" and r.token in eos):
                toks[r.uid].append(r.token)
            if r.finish_reason:
                done[r.uid] = now
    st = gen.stats
    return Run([toks[u] for u in uids], [done[u] for u in uids], time.perf_counter() - t0, st.steps, st.rows,
               st.generation_time)


def _mlx_lm(base, eos: set[int], prompts: list, max_tokens: int) -> Run:
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(base, max_tokens=max_tokens, stop_tokens=[[t] for t in sorted(eos)],
                         completion_batch_size=len(prompts))
    t0 = time.perf_counter()
    uids = gen.insert(prompts, [max_tokens] * len(prompts))
    toks, done = {u: [] for u in uids}, {}
    with gen.stats() as st:
        while responses := gen.next_generated():
            now = time.perf_counter() - t0
            for r in responses:
                if r.finish_reason != "stop":
                    toks[r.uid].append(r.token)
                if r.finish_reason:
                    done[r.uid] = now
    gen.close()
    return Run([toks[u] for u in uids], [done[u] for u in uids], time.perf_counter() - t0, st.generation_steps,
               st.generation_tokens, st.decode_time)


def _hf(hf, eos: list[int], prompts: list, max_tokens: int) -> Run:
    """transformers' batched greedy ``generate``, the prompts left-padded; a request's latency is
    the time of the step that gave its last token (finished rows go on as padding)."""
    import torch

    L, pad = max(len(p) for p in prompts), eos[0] if eos else 0  # padding is masked: any id will do
    ids = torch.tensor([[pad] * (L - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    clock = step_clock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                          eos_token_id=eos or None, pad_token_id=pad, streamer=clock)
    wall = time.perf_counter() - t0
    toks, latency = [], []
    for row in out[:, L:].tolist():
        ends = [k for k, t in enumerate(row) if t in eos]
        last = ends[0] if ends else len(row) - 1  # the step that gave its EOS, or its last token
        toks.append(row[: ends[0]] if ends else row)
        latency.append(clock.times[last + 1] - t0)  # times[0]: the prompt
    steps = len(clock.times) - 1
    return Run(toks, latency, wall, steps, steps * len(prompts), clock.times[-1] - clock.times[0])


def _alone(model, tokenizer, ids: list[int], max_tokens: int, stream_generate) -> list[int]:
    """A request decoded alone, plainly: the tokens every method must give (EOS dropped)."""
    return [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=max_tokens, medusa=False)
            if r.finish_reason != "stop"]


def _runners(backend: str, model, heads, tree, max_tokens: int):
    """(our model, its tokenizer, {method: run(prompts) -> Run}, the backend's ``stream_generate``)."""
    from ..core.budget import BatchBudget
    from ..core.tokens import eos_ids
    from ..default_model import resolve_model_path

    if backend == "torch":
        import torch
        from transformers import AutoModelForCausalLM

        from ..torch_compat import load, stream_generate

        med, tokenizer = load(model, heads=heads, tree=tree)
        hf = AutoModelForCausalLM.from_pretrained(str(resolve_model_path(model)), dtype=torch.float32).eval()
        eos = sorted(eos_ids(tokenizer, med.eos_token_ids))
        first = {"hf": lambda ps: _hf(hf, eos, ps, max_tokens)}
    else:
        from ..core.generation import stream_generate
        from ..loading import load

        med, tokenizer = load(model, heads=heads, tree=tree)
        eos = eos_ids(tokenizer, med.eos_token_ids)
        first = {"mlx_lm": lambda ps: _mlx_lm(med.base, eos, ps, max_tokens)}
    if med.heads is None:
        raise ValueError("bench --concurrency needs Medusa heads: pass --heads")
    budget = BatchBudget.for_model(med)
    runners = {**first, "plain": lambda ps: _ours(med, tokenizer, ps, max_tokens, False, budget),
               "medusa": lambda ps: _ours(med, tokenizer, ps, max_tokens, True, budget)}
    return med, tokenizer, runners, stream_generate


def _summary(run: Run, alone: list[list[int]], config, context: float, peak: float) -> dict:
    total = sum(len(t) for t in run.tokens)
    same = [t == a for t, a in zip(run.tokens, alone)]
    return {"tokens": total, "wall_s": run.wall, "tokens_per_s": total / max(run.wall, 1e-9),
            "latency_p50_s": float(np.percentile(run.latency, 50)),
            "latency_p95_s": float(np.percentile(run.latency, 95)),
            "identical": same, "all_identical": all(same),
            **roofline(run.steps, run.rows, run.step_seconds, config, context, peak)}


def run_concurrency(model=None, heads=None, tree=None, levels=DEFAULT_LEVELS, max_tokens: int = 64,
                    backend: str = "mlx", progress: bool = True) -> dict:
    """Every method at every concurrency level, in one run (see the module's docstring)."""
    from ..core.tokens import prompt_ids

    med, tokenizer, runners, stream_generate = _runners(backend, model, heads, tree, max_tokens)
    prompts = [prompt_ids(tokenizer, p["prompt"]) for p in bench_prompts()]
    peak = matmul_peak(backend, med.hidden_size)
    for run in runners.values():  # warm-up: one short request each, not timed
        run([prompts[0][:8]])
    alone: dict[int, list[int]] = {}
    levels_out = []
    for k, C in enumerate(levels):
        batch = [prompts[i % len(prompts)] for i in range(C)]
        for i in range(min(C, len(prompts))):
            if i not in alone:
                alone[i] = _alone(med, tokenizer, prompts[i], max_tokens, stream_generate)
        refs = [alone[i % len(prompts)] for i in range(C)]
        context = float(np.mean([len(p) for p in batch])) + max_tokens / 2
        order = list(runners) if k % 2 == 0 else list(runners)[::-1]  # each first in turn
        done = {}
        for m in order:
            s = done[m] = _summary(runners[m](batch), refs, med.config, context, peak)
            if progress:
                print(f"concurrency {C} {m}: {s['tokens_per_s']:.1f} tok/s, p95 {s['latency_p95_s']:.2f} s, "
                      f"{s['rows_per_step']:.1f} rows/step", file=sys.stderr)
        levels_out.append({"concurrency": C, "methods": {m: done[m] for m in runners}})
    return {"machine": machine(), "backend": backend, "model": str(model or "default"), "heads": str(heads or "shipped"),
            "tree": tree_facts(med),
            "max_tokens": max_tokens, "matmul_peak_gflops": peak / 1e9, "methods": METHODS[backend],
            "arrival": "all requests of a level arrive at once", "levels": levels_out}


def markdown(result: dict) -> str:
    names = result["methods"]
    lines = [f"{result['arrival']}; greedy, max {result['max_tokens']} tokens each; matmul peak "
             f"{result['matmul_peak_gflops']:.1f} GFLOP/s (float32 GEMM of the hidden size)", "",
             "| concurrency | method | total tok/s | p50 latency s | p95 latency s | identical to alone | "
             "rows/step | step ms | % of matmul peak |", "|---|---|---|---|---|---|---|---|---|"]
    for row in result["levels"]:
        for m, s in row["methods"].items():
            lines.append(f"| {row['concurrency']} | {names[m]} | {s['tokens_per_s']:.2f} | {s['latency_p50_s']:.2f} | "
                         f"{s['latency_p95_s']:.2f} | {sum(s['identical'])}/{len(s['identical'])} | "
                         f"{s['rows_per_step']:.1f} | {s['step_ms']:.1f} | {100 * s['peak_fraction']:.1f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [row["concurrency"] for row in result["levels"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for m, name in result["methods"].items():
        ax1.plot(levels, [row["methods"][m]["tokens_per_s"] for row in result["levels"]], marker="o", label=name)
        ax2.plot(levels, [row["methods"][m]["latency_p95_s"] for row in result["levels"]], marker="o", label=name)
    for ax, label in ((ax1, "total tokens/s"), (ax2, "p95 request latency, s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent requests (arriving at once)")
        ax.set_ylabel(label)
    ax1.legend()
    ax1.set_title(f"Batched decoding ({result['backend']}), greedy, one run")
    fig.tight_layout()
    save_figure(fig, path)


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx_medusa bench --concurrency", allow_abbrev=False,
                                description="Many requests at once: mlx-lm's or transformers' batching against ours.")
    p.add_argument("--concurrency", type=positive_ints, default=DEFAULT_LEVELS,
                   help="Concurrency levels, comma-separated (default 1,2,4,8,16)")
    p.add_argument("--backend", choices=["mlx", "torch"], default="mlx")
    p.add_argument("--model", default=None)
    p.add_argument("--heads", default=None)
    p.add_argument("--tree", default=None)
    p.add_argument("--max-tokens", type=positive_int, default=64)
    p.add_argument("--out", default="runs/bench", help="Folder for concurrency.json, .md, .png")
    return p


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--out {out}: {e.strerror}; pass a folder")
    try:
        res = run_concurrency(args.model, args.heads, args.tree, args.concurrency, args.max_tokens, args.backend)
    except (ValueError, FileNotFoundError, ImportError) as e:
        fail(e)
    md = markdown(res)
    print(md)
    write_results(out, "concurrency" if args.backend == "mlx" else "concurrency.torch", res, md, plot)
