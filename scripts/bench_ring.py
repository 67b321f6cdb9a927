#!/usr/bin/env python
"""Tokens/s of a local gRPC ring for 1, 2 and 3 nodes on loopback, Medusa on and off, and the
time each pass spends in transport (wall time less the nodes' compute: gRPC, bytes, wire format).

    python scripts/bench_ring.py --max-tokens 64 [--backends mlx] [--heads DIR] [--json]

Per ring size the nodes start once; each mode runs a short warm-up, then the measured request.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import exo_medusa_mlx

exo_medusa_mlx.setup_blas()  # before the first import of mlx
from exo_medusa_mlx.core.tokens import apply_template
from exo_medusa_mlx.ring.command import load_tokenizer
from exo_medusa_mlx.ring.launcher import LocalRing

PROMPT = "Explain in a few sentences why the sky is blue."


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default="1,2,3", help="ring sizes to measure")
    p.add_argument("--backends", default="mlx", help="backend of every node, or a comma list cycled over the nodes")
    p.add_argument("--model", default=None)
    p.add_argument("--heads", default=None, help="Medusa heads (default: the model's shipped heads)")
    p.add_argument("--tree", default=None)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="CPU threads per node")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list last")
    return p


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    cycle = [b.strip() for b in args.backends.split(",") if b.strip()]
    rows = []
    tokenizer = None
    for n in (int(x) for x in args.nodes.split(",")):
        backends = [cycle[i % len(cycle)] for i in range(n)]
        t0 = time.perf_counter()
        with LocalRing(backends, args.model, heads=args.heads, tree=args.tree, threads=args.threads) as ring:
            start_s = time.perf_counter() - t0
            if tokenizer is None:
                tokenizer = load_tokenizer(ring.model)
                prompt = apply_template(tokenizer, args.prompt, None, True)
                print(ring.medusa(), file=sys.stderr)
            with ring.client(timeout=120) as client:
                for medusa in (False, True):
                    client.generate(prompt, 8, medusa, eos_token_ids=tokenizer.eos_token_ids)  # warm-up
                    r = client.generate(prompt, args.max_tokens, medusa, eos_token_ids=tokenizer.eos_token_ids)
                    rows.append({
                        "nodes": n, "backends": ",".join(backends), "medusa": medusa, "tokens": len(r.tokens),
                        "tokens_per_s": round(r.generation_tps, 2), "passes": r.passes,
                        "mean_accepted": round(r.mean_accepted, 2),
                        "compute_ms_per_pass": round(1000 * sum(t.compute_s for t in r.nodes) / (r.passes + 1), 2),
                        "transport_ms_per_pass": round(1000 * r.transport_s / (r.passes + 1), 2),
                        "start_s": round(start_s, 1)})
                    print(_row(rows[-1]), file=sys.stderr, flush=True)
    print(_header())
    for row in rows:
        print(_row(row))
    if args.json:
        print(json.dumps(rows))


def _header() -> str:
    return (f"{'nodes':>5} {'backends':<16} {'medusa':>6} {'tokens':>6} {'tok/s':>7} {'passes':>6} "
            f"{'acc/pass':>8} {'compute ms/pass':>15} {'transport ms/pass':>17}")


def _row(r: dict) -> str:
    return (f"{r['nodes']:>5} {r['backends']:<16} {'on' if r['medusa'] else 'off':>6} {r['tokens']:>6} "
            f"{r['tokens_per_s']:>7.2f} {r['passes']:>6} {r['mean_accepted']:>8.2f} "
            f"{r['compute_ms_per_pass']:>15.2f} {r['transport_ms_per_pass']:>17.2f}")


if __name__ == "__main__":
    main()
