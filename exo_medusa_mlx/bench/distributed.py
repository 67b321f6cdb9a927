"""``mlx_medusa bench --distributed``: Medusa on and off over 1, 2, 3 loopback ranks, in one run.

For each rank count and split (``--parallel pipeline,tensor``) the driver launches
the ranks (``launch.launch``, one BLAS thread each unless told otherwise; 1 rank is
one plain process) running this module's worker: it loads and splits the model,
then decodes the bench prompts greedily with Medusa off and on, alternating per
prompt. Per configuration: generation tokens/s (tokens after the first over the
time since the first, as ``mlx_medusa bench``), Medusa's speed-up over plain
decoding in the same configuration, the accepted length, the time per step and the
part of it each rank spent waiting in distributed ops (transfers, and other ranks'
compute: a pipeline rank idles while the others run their layers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..cli_args import non_negative_int, positive_float, positive_int

DEFAULT_RANKS = "1,2,3"


def _decode(model, tokenizer, ids, max_tokens, medusa, comm) -> dict:
    from ..core.generation import stream_generate

    tokens, first, comm_first, last = [], None, 0.0, None
    for last in stream_generate(model, tokenizer, ids, max_tokens=max_tokens, medusa=medusa):
        tokens.append(last.token)
        if first is None:  # the prefill's token: timing starts here
            first, comm_first = time.perf_counter(), comm.seconds if comm else 0.0
    secs = time.perf_counter() - first
    comm_s = (comm.seconds if comm else 0.0) - comm_first
    return {"tokens": tokens, "seconds": secs, "steps": last.steps, "verified": last.mean_accepted * last.steps,
            "comm_seconds": comm_s}


def worker(args) -> None:
    """One rank: load, split, decode every prompt with Medusa off and on; rank 0 writes the result."""
    from .._blas import setup_blas

    setup_blas()  # before the first import of mlx (``python -m exo_medusa_mlx.bench.distributed``)
    import mlx.core as mx

    from .. import distributed as dist
    from ..core.tokens import apply_template
    from ..loading import load
    from ..training.prompts import bench_prompts

    comm = dist.init(args.dist_timeout) if os.environ.get("MLX_RANK") else None
    model, tokenizer = load(args.model, heads=args.heads, tree=args.tree, lazy=comm is not None)
    if model.heads is None:
        raise ValueError("the distributed bench needs Medusa heads: pass --heads")
    layout = dist.shard(model, comm, args.parallel) if comm else "1 rank"
    runs = {"off": [], "on": []}
    _decode(model, tokenizer, apply_template(tokenizer, "Hi", None, True), 8, True, comm)  # warm-up
    for p in bench_prompts()[: args.limit]:
        ids = apply_template(tokenizer, p["prompt"], None, True)
        for key, medusa in (("off", False), ("on", True)):
            runs[key].append(_decode(model, tokenizer, ids, args.max_tokens, medusa, comm))
    res = {key: _total(r) for key, r in runs.items()}
    res["same_tokens"] = all(a["tokens"] == b["tokens"] for a, b in zip(runs["off"], runs["on"]))
    if comm is not None:  # every rank's waiting time, gathered to all
        mine = mx.array([[res["off"]["comm_ms_per_step"], res["on"]["comm_ms_per_step"]]], dtype=mx.float32)
        every = comm.all_gather(mine, "gathering the bench's figures").tolist()
        for i, key in enumerate(("off", "on")):
            res[key]["comm_ms_per_step"] = [row[i] for row in every]
    if comm is None or comm.rank == 0:
        Path(args.result).write_text(json.dumps({"layout": layout, "tree_size": model.tree.size, **res}))


def _total(runs: list[dict]) -> dict:
    tokens, secs = sum(len(r["tokens"]) - 1 for r in runs), sum(r["seconds"] for r in runs)
    steps, verified = sum(r["steps"] for r in runs), sum(r["verified"] for r in runs)
    return {"tokens": tokens, "generation_tps": tokens / secs if secs else 0.0,
            "mean_accepted": verified / steps if steps else 0.0, "step_ms": 1e3 * secs / steps if steps else 0.0,
            "comm_ms_per_step": 1e3 * sum(r["comm_seconds"] for r in runs) / steps if steps else 0.0}


def run_config(args, n: int, parallel: str, tmp: Path) -> dict:
    """Launch one configuration; its result, or {"error": the failing rank's last line}."""
    from ..launch import launch

    result = tmp / f"{parallel}-{n}.json"
    log = tmp / f"{parallel}-{n}.log"
    argv = [sys.executable, "-m", "exo_medusa_mlx.bench.distributed", "--worker", "--parallel", parallel,
            "--result", str(result), "--max-tokens", str(args.max_tokens), "--dist-timeout", str(args.dist_timeout)]
    for flag in ("model", "heads", "tree", "limit"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    with open(log, "w") as err:
        if n == 1:
            env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads), "OPENBLAS_NUM_THREADS": str(args.threads)}
                                    if args.threads else {})}
            code = subprocess.run(argv, env=env, stderr=err, stdout=subprocess.DEVNULL).returncode
        else:
            code = launch(argv, n, threads=args.threads or None, stdout=subprocess.DEVNULL, stderr=err)
    if code != 0 or not result.exists():
        lines = [ln for ln in log.read_text().splitlines() if ln.startswith("error") or "Error" in ln]
        return {"error": (lines[-1] if lines else f"exit code {code}; log: {log}")}
    return json.loads(result.read_text())


def markdown(rows: list[dict]) -> str:
    lines = ["| ranks | split | plain tok/s | Medusa tok/s | speed-up | accepted | step ms (plain / Medusa) "
             "| comm ms per step, per rank (plain / Medusa) | same tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r = row["result"]
        if "error" in r:
            lines.append(f"| {row['ranks']} | {row['parallel']} | n/a: {r['error']} | | | | | | |")
            continue
        off, on = r["off"], r["on"]

        def comm(x):
            v = x["comm_ms_per_step"]
            return "-" if not isinstance(v, list) else "/".join(f"{c:.1f}" for c in v)

        lines.append(f"| {row['ranks']} | {row['parallel']} | {off['generation_tps']:.2f} | {on['generation_tps']:.2f} "
                     f"| {on['generation_tps'] / off['generation_tps']:.2f}x | {on['mean_accepted']:.2f} "
                     f"| {off['step_ms']:.1f} / {on['step_ms']:.1f} | {comm(off)} / {comm(on)} "
                     f"| {'yes' if r['same_tokens'] else 'NO'} |")
    return "\n".join(lines)


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx_medusa bench --distributed", allow_abbrev=False,
                                description="Medusa on and off over 1, 2 and 3 loopback ranks of MLX distributed.")
    p.add_argument("--model", default=None)
    p.add_argument("--heads", default=None)
    p.add_argument("--tree", default=None, help="Tree preset, JSON file or dynamic[:N]")
    p.add_argument("--max-tokens", type=positive_int, default=48)
    p.add_argument("--limit", type=positive_int, default=None, help="Only the first N bench prompts")
    p.add_argument("--ranks", default=DEFAULT_RANKS, help="Rank counts, comma-separated")
    p.add_argument("--parallel", default="pipeline", help="pipeline, tensor or both (comma-separated)")
    p.add_argument("--threads", type=non_negative_int, default=1, help="BLAS threads per rank (0: the environment's)")
    p.add_argument("--dist-timeout", type=positive_float, default=600.0)
    p.add_argument("--out", default="runs/bench_distributed", help="Folder for bench_distributed.{json,md}")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p


def _parse(args) -> tuple[list[int], list[str]]:
    try:
        ranks = [int(r) for r in args.ranks.split(",")]
    except ValueError:
        raise ValueError(f"--ranks '{args.ranks}': give rank counts such as 1,2,3") from None
    splits = args.parallel.split(",")
    if any(r < 1 for r in ranks) or not set(splits) <= {"pipeline", "tensor"}:
        raise ValueError(f"--ranks {args.ranks} / --parallel {args.parallel}: ranks >= 1; pipeline and/or tensor")
    return ranks, splits


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    try:
        if args.worker:
            return worker(args)
        ranks, splits = _parse(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    configs = [(1, "-")] * (1 in ranks) + [(n, s) for s in splits for n in ranks if n > 1]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as tmp:
        for n, parallel in configs:
            print(f"bench: {n} rank(s), {parallel} ...", file=sys.stderr, flush=True)
            rows.append({"ranks": n, "parallel": parallel,
                         "result": run_config(args, n, "pipeline" if parallel == "-" else parallel, Path(tmp))})
    md = markdown(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_distributed.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    (out / "bench_distributed.md").write_text(md + "\n")
    print(md)
    print(f"wrote {out}/bench_distributed.json, bench_distributed.md")


if __name__ == "__main__":
    main()
