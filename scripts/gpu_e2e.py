"""Greedy Medusa against plain decoding end to end on one backend: speed, and the same tokens.

One model load; per prompt (the bench prompts, chat template), plain decoding then
Medusa with each ``--tree``, back to back, after one untimed run of each (CUDA
graph capture, MLX warm-up). Prints generation tokens per second (mlx-lm's count:
from the first token on), mean accepted length, the speed-up over plain, and
whether every Medusa run gave plain decoding's tokens.

    python scripts/gpu_e2e.py --backend torch --dtype float32 --tree default --tree mc16.json --json out.json

The model defaults to the embedded SmolLM2-135M-Instruct and its shipped heads;
``default`` is the tree shipped with them. CI runs it at tiny sizes
(tests/test_gpu_scripts.py); scripts/gpu_issue22.sh runs it on a GPU.
"""

from __future__ import annotations

import argparse
import json
import time

from exo_medusa_mlx import backends
from exo_medusa_mlx.training.prompts import bench_prompts
from exo_medusa_mlx.core.generation import stream_generate
from exo_medusa_mlx.core.tokens import apply_template


def decode(model, tokenizer, ids, max_tokens: int, tree) -> dict:
    """One greedy generation: its tokens, decode time (after the first token) and steps."""
    tokens, last, t0 = [], None, time.perf_counter()
    for last in stream_generate(model, tokenizer, ids, max_tokens=max_tokens, medusa=tree is not None, tree=tree):
        tokens.append(last.token)
    n = max(last.generation_tokens - 1, 0)
    seconds = n / last.generation_tps if last.generation_tps > 0 else time.perf_counter() - t0
    return {"tokens": tokens, "decoded": n, "seconds": seconds, "steps": last.steps}


def compare(model, tokenizer, prompts: list, trees: dict, max_tokens: int) -> dict:
    """Plain, then each tree, per prompt; totals per method and whether tokens matched plain's."""
    runs = {"plain": None, **trees}
    for name, tree in runs.items():  # warm-up: CUDA graph capture, allocations
        decode(model, tokenizer, prompts[0], 8, tree)
    total = {name: {"decoded": 0, "seconds": 0.0, "steps": 0, "identical": 0} for name in runs}
    for ids in prompts:
        plain = None
        for name, tree in runs.items():
            r = decode(model, tokenizer, ids, max_tokens, tree)
            plain = r["tokens"] if name == "plain" else plain
            t = total[name]
            t["decoded"] += r["decoded"]
            t["seconds"] += r["seconds"]
            t["steps"] += r["steps"]
            t["identical"] += r["tokens"] == plain
    out = {}
    for name, t in total.items():
        tps = t["decoded"] / max(t["seconds"], 1e-9)
        out[name] = {"tok_per_s": round(tps, 2), "identical": f"{t['identical']}/{len(prompts)}",
                     "mean_accepted": round(t["decoded"] / max(t["steps"], 1), 3) if name != "plain" else 1.0}
    for name in trees:
        out[name]["speedup"] = round(out[name]["tok_per_s"] / max(out["plain"]["tok_per_s"], 1e-9), 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=list(backends.BACKENDS), default="torch")
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--heads", default=None, help="default: the model's heads (the shipped ones for the default model)")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                    help="float32: tokens must be identical (lossless); others report the speed")
    ap.add_argument("--tree", action="append", default=None,
                    help="'default' (the heads' tree), a preset or a JSON file; repeat for several")
    ap.add_argument("--limit", type=int, default=8, help="first N bench prompts")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    model, tokenizer = backends.load(args.backend, args.model, args.heads, None, args.dtype)
    if model.heads is None:
        raise SystemExit("error: the model has no Medusa heads: pass --heads")
    trees = {name: (model.tree if name == "default" else name) for name in (args.tree or ["default"])}
    prompts = [apply_template(tokenizer, p["prompt"], None, True) for p in bench_prompts()[: args.limit]]
    res = {"backend": args.backend, "device": str(getattr(model, "device", "mlx default")), "dtype": args.dtype,
           "max_tokens": args.max_tokens, "prompts": len(prompts),
           "methods": compare(model, tokenizer, prompts, trees, args.max_tokens)}
    for name, r in res["methods"].items():
        print(f"{args.backend:5s} {args.dtype:8s} {name:24s} {r}", flush=True)
    print(json.dumps(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
