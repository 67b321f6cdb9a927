"""``mlx_medusa bench``: Medusa against the decoders users already have, in one run.

Per prompt, the methods run back to back (alternating), greedy, same model:
  a  mlx-lm's own stream_generate          (the Mac user's baseline)
  b  ours, --no-medusa                     (our plumbing alone)
  c  ours, Medusa                          (heads + tree)
  d  transformers generate, greedy         (the NVIDIA user's baseline)
  e  transformers prompt-lookup decoding
  f  ours on torch, Medusa
Speed-ups are ratios within this run: b, c against a; e, f against d.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..cli_args import fail, non_negative_float, positive_int
from ..training.prompts import bench_prompts
from .measure import machine, run_mlx_lm, run_ours, save, save_figure, step_clock, tree_facts, write_results

MLX_METHODS = {"a": "mlx-lm stream_generate", "b": "ours --no-medusa (MLX)", "c": "ours Medusa (MLX)"}
TORCH_METHODS = {"d": "transformers generate", "e": "transformers prompt lookup", "f": "ours Medusa (torch)"}
SUITES = ("prompts", "kinds")  # --suite: this module's methods on the bench prompts, or bench/kinds.py


# --- one run of each method: returns tokens and stats (ours and mlx-lm's: measure.py) --

def _hf(model, ids, max_tokens, eos, lookup: int | None):
    import resource

    import torch

    clock = step_clock()
    x = torch.tensor([ids])
    kw = {"prompt_lookup_num_tokens": lookup} if lookup else {}
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos[0], streamer=clock, **kw)
    t1 = time.perf_counter()
    toks = [t for t in out[0, len(ids):].tolist()]
    while toks and toks[-1] in eos:
        toks.pop()
    first = clock.times[1] if len(clock.times) > 1 else t1
    n = len(out[0]) - len(ids)
    return {"tokens": toks, "generation_tps": (n - 1) / max(t1 - first, 1e-9) if n > 1 else 0.0,
            "prompt_tps": len(ids) / max(first - t0, 1e-9), "mean_accepted": None, "steps": None,
            "peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}


# --- the run --------------------------------------------------------------------

def _add_torch(runners: dict, trees: dict, notes: list, model, heads, tree, path, eos: set[int],
               max_tokens: int) -> None:
    """The torch side's runners (d, e, f) and tree, or a note saying why it is missing."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        notes.append(f"torch side skipped: {e}")
        return
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    eos = sorted(eos)
    runners["d"] = lambda ids: _hf(hf, ids, max_tokens, eos, None)
    runners["e"] = lambda ids: _hf(hf, ids, max_tokens, eos, 10)
    try:
        from ..torch_compat import load as torch_load
        from ..torch_compat import stream_generate as torch_stream
    except ImportError as e:
        notes.append(f"f skipped: torch Medusa unavailable ({e})")
        return
    tmodel, ttok = torch_load(model, heads=heads, tree=tree)
    runners["f"] = lambda ids: run_ours(tmodel, ttok, ids, max_tokens, True, torch_stream)
    trees["torch"] = tree_facts(tmodel)


def run_bench(model=None, heads=None, tree=None, max_tokens=128, limit=None, torch_side=True,
              methods="abcdef", temp=0.0) -> dict:
    """All methods, alternating per prompt. ``temp`` > 0 samples (MLX methods only, exact
    acceptance for Medusa): speeds and accepted lengths, not token equality, then count."""
    from tqdm import tqdm

    from ..core.generation import stream_generate
    from ..core.tokens import apply_template, eos_ids
    from ..loading import load

    med, tokenizer = load(model, heads=heads, tree=tree)
    if med.heads is None:
        raise ValueError("bench needs Medusa heads: pass --heads (the default model's shipped heads are used when present)")
    from ..default_model import resolve_model_path

    path = resolve_model_path(model)
    trees = {"mlx": tree_facts(med)}  # what (c) and (f) verify with
    runners = {  # (a) runs mlx-lm on the same model object: our wrapper leaves it as loaded between calls
        "a": lambda ids: run_mlx_lm(med.base, tokenizer, ids, max_tokens, temp),
        "b": lambda ids: run_ours(med, tokenizer, ids, max_tokens, False, stream_generate, temp),
        "c": lambda ids: run_ours(med, tokenizer, ids, max_tokens, True, stream_generate, temp),
    }
    notes = []
    if temp > 0:
        notes.append(f"sampling at temperature {temp}: outputs differ by design; the torch side is greedy-only")
        torch_side = False
    if torch_side and set(methods) & set("def"):
        _add_torch(runners, trees, notes, model, heads, tree, path, eos_ids(tokenizer), max_tokens)
    order = [m for m in methods if m in runners]
    prompts = bench_prompts()[:limit]
    rows = []
    # Warm-up: one short run of each method, not timed.
    warm = apply_template(tokenizer, "Hi", None, True)
    for m in order:
        runners[m](warm)
    bar = tqdm(total=len(prompts) * len(order), desc="bench", unit="run")
    for p in prompts:
        ids = list(apply_template(tokenizer, p["prompt"], None, True))
        row = {"category": p["category"], "prompt": p["prompt"], "prompt_tokens": len(ids), "runs": {}}
        for m in order:
            r = runners[m](ids)
            row["runs"][m] = r
            bar.update(1)
            bar.set_postfix_str(f"{m}: {r['generation_tps']:.1f} tok/s")
        for m, r in row["runs"].items():
            base = "a" if m in MLX_METHODS else "d"
            if base in row["runs"]:
                ref = row["runs"][base]
                r["speedup"] = r["generation_tps"] / ref["generation_tps"] if ref["generation_tps"] else None
                r["same_tokens"] = r["tokens"] == ref["tokens"]
        rows.append(row)
    bar.close()
    return {"machine": machine(), "model": str(path), "heads": str(heads or "shipped"), "temp": temp,
            "tree": tree_facts(med), "trees": trees,
            "max_tokens": max_tokens, "methods": {**MLX_METHODS, **TORCH_METHODS}, "order": order,
            "notes": notes, "prompts": rows, "overall": summarize(rows, order)}


def summarize(rows: list[dict], order: list[str]) -> dict:
    out = {}
    for m in order:
        runs = [r["runs"][m] for r in rows if m in r["runs"]]
        toks = sum(len(r["tokens"]) for r in runs)
        # Overall tokens/s: total tokens over total generation time.
        secs = sum(len(r["tokens"]) / r["generation_tps"] for r in runs if r["generation_tps"])
        acc = [r["mean_accepted"] for r in runs if r.get("mean_accepted")]
        # Weighted by steps: the nodes verified over the steps taken (a dynamic tree's size varies).
        nodes = [(r["mean_tree_size"] * r["steps"], r["steps"]) for r in runs if r.get("mean_tree_size")]
        out[m] = {
            "generation_tps": toks / secs if secs else 0.0,
            "prompt_tps": float(np.mean([r["prompt_tps"] for r in runs])),
            "mean_accepted": float(np.mean(acc)) if acc else None,
            "mean_tree_size": sum(n for n, _ in nodes) / sum(k for _, k in nodes) if nodes else None,
            "peak_memory_gb": max(r["peak_memory_gb"] for r in runs),
            # None: the baseline ((a) or (d)) did not run, so nothing was compared.
            "all_same_tokens": all(r["same_tokens"] for r in runs) if all("same_tokens" in r for r in runs) else None,
        }
    for m in order:
        base = "a" if m in MLX_METHODS else "d"
        if base in out and out[base]["generation_tps"]:
            out[m]["speedup"] = out[m]["generation_tps"] / out[base]["generation_tps"]
    return out


def markdown(result: dict) -> str:
    names = result["methods"]
    lines = ["| method | gen tok/s | prompt tok/s | mean accepted | speed-up | same tokens as baseline |",
             "|---|---|---|---|---|---|"]
    for m, s in result["overall"].items():
        acc = f"{s['mean_accepted']:.2f}" if s["mean_accepted"] else "-"
        sp = f"{s.get('speedup', 0):.2f}x" if s.get("speedup") else "-"
        same = ("n/a (sampling)" if result.get("temp") else "n/a (no baseline run)" if s["all_same_tokens"] is None
                else "yes" if s["all_same_tokens"] else "NO")
        lines.append(f"| ({m}) {names[m]} | {s['generation_tps']:.2f} | {s['prompt_tps']:.1f} | {acc} | {sp} | {same} |")
    lines.append("")
    for side, t in result.get("trees", {}).items():
        used = result["overall"].get({"mlx": "c", "torch": "f"}[side], {}).get("mean_tree_size")
        shape = (f"dynamic, at most {t['size']} nodes" if t["choices"] == "dynamic"
                 else f"{t['size']} nodes {t['choices']}")
        lines.append(f"{side} tree: {shape}" + (f", {used:.2f} nodes per step on average" if used else "")
                     + f", transposed product {'on' if t['rows_product'] else 'off'}")
    lines.append("")
    lines.append("| prompt | category | " + " | ".join(f"({m}) tok/s" for m in result["order"]) + " | (c) accepted |")
    lines.append("|---|---|" + "---|" * (len(result["order"]) + 1))
    for r in result["prompts"]:
        cells = [f"{r['runs'][m]['generation_tps']:.1f}" for m in result["order"]]
        acc = r["runs"].get("c", {}).get("mean_accepted")
        lines.append(f"| {r['prompt'][:40]} | {r['category']} | " + " | ".join(cells)
                     + (f" | {acc:.2f} |" if acc is not None else " | - |"))
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [r["runs"]["c"]["mean_accepted"] for r in result["prompts"] if "c" in r["runs"]]
    fig, axes = plt.subplots(1, 2 if acc else 1, figsize=(11 if acc else 6, 4), squeeze=False)
    ax1 = axes[0, 0]
    ov = result["overall"]
    ms = list(ov)
    ax1.bar([f"({m})" for m in ms], [ov[m]["generation_tps"] for m in ms], color="tab:blue")
    ax1.set_ylabel("generation tokens/s")
    ax1.set_title("Greedy decoding, same model, one run")
    if acc:
        ax2 = axes[0, 1]
        ax2.hist(acc, bins=12, color="tab:green")
        ax2.set_xlabel("mean accepted tokens per step (per prompt)")
        ax2.set_title("Medusa (MLX) accepted length")
    fig.tight_layout()
    save_figure(fig, path)


def latency_curve(model=None, ns=(1, 2, 4, 8, 16, 32, 64, 128), cache_len=256, repeats=5, torch_side=True) -> dict:
    """Time one forward of N new tokens over a cache of ``cache_len`` tokens."""
    import mlx.core as mx

    from ..core.step import prefill
    from ..loading import load

    med, _ = load(model, heads=None, tree=[])
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, med.vocab_size, cache_len)
    out = {"cache_len": cache_len, "mlx": {}, "torch": {}}
    for n in ns:
        times = []
        for _ in range(repeats + 1):
            ctx, caches = med.make_cache()
            prefill(med, ctx, caches, prompt)
            toks = mx.array(rng.integers(0, med.vocab_size, n))
            t = time.perf_counter()
            mx.eval(med.logits(med.forward(ctx, caches, toks)))
            times.append(time.perf_counter() - t)
        out["mlx"][n] = float(np.median(times[1:]))
    if torch_side:
        try:
            import torch
            from transformers import AutoModelForCausalLM

            from ..default_model import resolve_model_path

            hf = AutoModelForCausalLM.from_pretrained(str(resolve_model_path(model)), dtype=torch.float32).eval()
            for n in ns:
                times = []
                for _ in range(repeats + 1):
                    with torch.inference_mode():
                        o = hf(torch.tensor([prompt.tolist()]), use_cache=True)
                        toks = torch.tensor([rng.integers(0, med.vocab_size, n).tolist()])
                        t = time.perf_counter()
                        hf(toks, past_key_values=o.past_key_values, use_cache=True)
                        times.append(time.perf_counter() - t)
                out["torch"][n] = float(np.median(times[1:]))
        except ImportError as e:
            out["torch_skipped"] = str(e)
    for side in ("mlx", "torch"):
        if out[side]:
            one = out[side][ns[0]]
            out[side + "_relative"] = {n: t / one for n, t in out[side].items()}
    return out


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx_medusa bench", allow_abbrev=False, description="Medusa vs the decoders users have, one run.")
    p.add_argument("--model", default=None)
    p.add_argument("--heads", default=None)
    p.add_argument("--tree", default=None,
                   help="Tree preset, JSON file, dynamic[:N] (chosen every step; the runs record the mean size "
                        "used) or best:N (the heads' best static tree of N nodes); default: the heads' tuned tree")
    p.add_argument("--max-tokens", type=positive_int, default=128)
    p.add_argument("--limit", type=positive_int, default=None, help="Only the first N prompts")
    p.add_argument("--methods", default="abcdef", help="Subset of a-f")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--temp", type=non_negative_float, default=0.0,
                   help="Sample (MLX methods; Medusa uses exact acceptance)")
    p.add_argument("--latency", action="store_true", help="Latency-curve mode: one forward of N tokens over a cache")
    p.add_argument("--cache-len", type=positive_int, default=256)
    p.add_argument("--out", default="runs/bench", help="Folder for bench.json, bench.md, bench.png")
    p.add_argument("--suite", choices=SUITES, default=SUITES[0],
                   help="prompts: methods a-f on the bench prompts (these options); kinds: Medusa per task kind on "
                        "held-out prompts (--suite kinds --help)")
    p.add_argument("--distributed", action="store_true",
                   help="Medusa on/off over 1, 2, 3 loopback ranks of MLX distributed (--distributed --help)")
    p.add_argument("--concurrency", default=None,
                   help="Levels such as 1,2,4,8,16: many requests at once, batched (--concurrency 1 --help)")
    return p


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--distributed" in argv:
        from .distributed import main as distributed_main

        return distributed_main([a for a in argv if a != "--distributed"])
    if any(a == "--concurrency" or a.startswith("--concurrency=") for a in argv):
        from .concurrency import main as concurrency_main

        return concurrency_main(argv)
    pick = argparse.ArgumentParser(prog="mlx_medusa bench", add_help=False, allow_abbrev=False)
    pick.add_argument("--suite", choices=SUITES, default=SUITES[0])
    suite, argv = pick.parse_known_args(argv)
    if suite.suite == "kinds":
        from .kinds import main as kinds_main

        return kinds_main(argv)
    args = setup_arg_parser().parse_args(argv)
    if not set(args.methods) <= set("abcdef"):
        sys.exit(f"error: --methods '{args.methods}' must be letters among a-f")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: --out {out}: {e.strerror}; pass a folder")
    try:
        if args.latency:
            res = latency_curve(args.model, cache_len=args.cache_len, torch_side=not args.no_torch)
            print(f"one forward of N tokens over {args.cache_len} cached, relative to N=1:")
            for side in ("mlx", "torch"):
                rel = res.get(side + "_relative")
                if rel:
                    print(f"  {side:5s} " + "  ".join(f"{n}:{r:.2f}x" for n, r in rel.items())
                          + f"   (N=1: {res[side][1] * 1e3:.1f} ms)")
            save(out / "latency.json", json.dumps(res, indent=1))
            return
        res = run_bench(args.model, args.heads, args.tree, args.max_tokens, args.limit, not args.no_torch,
                        args.methods, args.temp)
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    md = markdown(res)
    print(md)
    for n in res["notes"]:
        print("note:", n)
    write_results(out, "bench", res, md, plot)


if __name__ == "__main__":
    main()
