#!/usr/bin/env python
"""Medusa inside exo 0.0.x's own node: a ring of exo processes on loopback, stock and under
``mlx_medusa exo``, the bench prompts through each, greedy; tokens, ring passes, tokens/s, same text.

    python scripts/bench_exo_ring.py [--nodes 2] [--engines mlx|mlx,torch] [--limit N] [--max-tokens 48] [--json]

The ring starts twice on the default model (its shipped heads): first stock (exo's own node with
our engines registered, one token per pass), then under ``mlx_medusa exo``; one warm-up request
each loads the shards. Every prompt is asked at the node holding the first layers. Medusa's
passes come from the ``exo-medusa: request`` lines the last node prints. tokens/s is per request,
end to end (prefill included). exo's source: ``EXO_SRC`` or ``../shared/exo-0.0.x/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

import exo_medusa_mlx

exo_medusa_mlx.setup_blas()  # before the first import of mlx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the exo harness: tests/helpers
from exo_medusa_mlx.training.prompts import bench_prompts
from helpers.exo_harness import MEDUSA, STOCK, ExoRing, exo_source, missing_imports

ENGINES = {"mlx": "medusa-mlx", "torch": "medusa-torch"}
WARM_UP = "Hello."
TARGET = 1.4  # tokens per ring pass (issue 19)


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--nodes", type=int, default=2, help="exo nodes in the ring")
    p.add_argument("--engines", default="mlx", help="engine of every node (mlx, torch), or a comma list cycled "
                                                    "over the nodes in ring order (first: the first layers)")
    p.add_argument("--limit", type=int, default=None, help="the first N bench prompts (default: all)")
    p.add_argument("--max-tokens", type=int, default=48, help="the nodes' --max-generate-tokens")
    p.add_argument("--threads", type=int, default=None, help="BLAS/OpenMP threads per node (default: cores / nodes)")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds for every node to see the ring")
    p.add_argument("--log-dir", default=None, help="keep the nodes' homes and logs here (default: a temporary "
                                                   "folder, removed unless the run fails)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object last")
    return p


def ring_engines(spec: str, nodes: int) -> list[str]:
    cycle = [e.strip() for e in spec.split(",") if e.strip()]
    bad = [e for e in cycle if e not in ENGINES]
    if bad or not cycle:
        raise ValueError(f"--engines {spec!r}: give {' or '.join(ENGINES)} per node, comma separated")
    if nodes < 1:
        raise ValueError(f"--nodes {nodes}: give 1 or more")
    return [ENGINES[cycle[i % len(cycle)]] for i in range(nodes)]


def run_ring(src: Path, home: Path, medusa: bool, engines: list[str], prompts: list[dict], args) -> list[dict]:
    """Start the ring, warm it up, ask every prompt; per prompt: text, tokens, passes, seconds."""
    label = "mlx_medusa exo" if medusa else "stock"
    print(f"starting {len(engines)} exo nodes ({label}: {', '.join(engines)}; {args.threads} threads per node)",
          file=sys.stderr, flush=True)
    with ExoRing(src, home, MEDUSA if medusa else STOCK, engines, max_tokens=args.max_tokens, threads=args.threads,
                 response_timeout=900, start_timeout=args.start_timeout) as ring:
        ring.ask(WARM_UP)
        replies = [ring.ask(p["prompt"]) for p in tqdm(prompts, desc=label, unit="prompt")]
        passes = ring.passes(expect=[r.request_id for r in replies]) if medusa else {}
    rows = []
    for r in replies:
        if medusa and r.request_id not in passes:
            raise RuntimeError(f"no 'exo-medusa: request {r.request_id}' line in the node logs ({home}): "
                               "the ring did not run under mlx_medusa exo")
        n_passes = passes[r.request_id][1] if medusa else r.tokens  # a stock ring: one token per pass
        seconds = round(r.seconds, 3)
        rows.append({"text": r.text, "tokens": r.tokens, "passes": n_passes, "seconds": seconds,
                     "tokens_per_s": round(r.tokens / seconds, 2)})
    return rows


def summarize(prompts: list[dict], stock: list[dict], medusa: list[dict]) -> dict:
    rows = [{"index": i, "category": p.get("category", ""), "stock": s, "medusa": m,
             "tokens_per_pass": round(m["tokens"] / m["passes"], 2), "same_text": s["text"] == m["text"]}
            for i, (p, s, m) in enumerate(zip(prompts, stock, medusa))]
    total = {}
    for side, runs in (("stock", stock), ("medusa", medusa)):
        tokens, passes, seconds = (sum(r[k] for r in runs) for k in ("tokens", "passes", "seconds"))
        total[side] = {"tokens": tokens, "passes": passes, "seconds": round(seconds, 3),
                       "tokens_per_s": round(tokens / seconds, 2)}
    total["tokens_per_pass"] = round(total["medusa"]["tokens"] / total["medusa"]["passes"], 2)
    total["speedup"] = round(total["medusa"]["tokens_per_s"] / total["stock"]["tokens_per_s"], 2)
    total["same_text"] = sum(r["same_text"] for r in rows)
    return {"prompts": rows, "total": total}


def print_table(summary: dict, engines: list[str]) -> None:
    print(f"{'#':>3} {'category':<12} {'tokens':>6} {'stock tok/s':>11} {'medusa tokens':>13} {'passes':>6} "
          f"{'tok/pass':>8} {'medusa tok/s':>12} {'speed-up':>8}  same text")
    for r in summary["prompts"]:
        s, m = r["stock"], r["medusa"]
        print(f"{r['index']:>3} {r['category'][:12]:<12} {s['tokens']:>6} {s['tokens_per_s']:>11.2f} "
              f"{m['tokens']:>13} {m['passes']:>6} {r['tokens_per_pass']:>8.2f} {m['tokens_per_s']:>12.2f} "
              f"{m['tokens_per_s'] / s['tokens_per_s']:>7.2f}x  {'yes' if r['same_text'] else 'NO'}")
    t, s, m = summary["total"], summary["total"]["stock"], summary["total"]["medusa"]
    n = len(summary["prompts"])
    print(f"stock ring ({len(engines)} nodes: {', '.join(engines)}): {s['tokens']} tokens in {s['passes']} ring "
          f"passes, {s['tokens_per_s']:.2f} tok/s")
    print(f"mlx_medusa exo ring: {m['tokens']} tokens in {m['passes']} ring passes ({t['tokens_per_pass']:.2f} "
          f"per pass; target {TARGET}: {'met' if t['tokens_per_pass'] >= TARGET else 'NOT met'}), "
          f"{m['tokens_per_s']:.2f} tok/s ({t['speedup']:.2f}x stock)")
    print(f"text identical to the stock ring: {t['same_text']} of {n} prompts")


def main(argv=None) -> dict:
    args = setup_arg_parser().parse_args(argv)
    try:
        engines = ring_engines(args.engines, args.nodes)
    except ValueError as e:
        sys.exit(f"error: {e}")
    for flag, value in (("--limit", args.limit), ("--max-tokens", args.max_tokens), ("--threads", args.threads)):
        if value is not None and value < 1:
            sys.exit(f"error: {flag} {value}: give 1 or more")
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.nodes)
    src, why = exo_source()
    if src is None:
        sys.exit(f"error: {why}")
    why = missing_imports(src)
    if why:
        sys.exit(f"error: {why}")
    prompts = bench_prompts()[: args.limit]
    work = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="bench-exo-ring-"))
    try:
        stock = run_ring(src, work / "stock", False, engines, prompts, args)
        medusa = run_ring(src, work / "medusa", True, engines, prompts, args)
    except (RuntimeError, TimeoutError) as e:
        sys.exit(f"error: {str(e).splitlines()[0]} (node logs: {work})")
    if not args.log_dir:
        shutil.rmtree(work, ignore_errors=True)
    summary = {"nodes": args.nodes, "engines": engines, "max_tokens": args.max_tokens, "threads": args.threads,
               **summarize(prompts, stock, medusa)}
    print_table(summary, engines)
    if args.json:
        print(json.dumps(summary))
    if summary["total"]["same_text"] != len(prompts):
        sys.exit("error: the mlx_medusa exo ring's text differs from the stock ring's (greedy must be lossless)")
    return summary


if __name__ == "__main__":
    main()
