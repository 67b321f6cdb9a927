"""Medusa inside exo 1.x's own runner vs exo's plain engines, measured side by side in one run.

    python scripts/bench_exo1.py [--prompts 8] [--max-tokens 128] [--concurrency 1 4] [--json out.json]

Runs, one after another in one process of exo's venv (``scripts/setup_exo1.sh``), four
runners of the default model through exo's ``RunnerSupervisor`` (``tests/helpers/exo1_driver.py``):
exo's ``SequentialGenerator`` (``EXO_NO_BATCH=1``), exo's ``BatchGenerator`` (its default),
and Medusa in each of them (``install()``); each serves the same greedy requests (the
bench prompts, the chat template) one at a time and in groups of N at once. Prints
generated tokens per second (all of a group's tokens over the group's wall time), the
issue's targets as ratios (Medusa >= 1.3x exo's plain engine at concurrency 1, never
below exo's plain batched engine at the largest concurrency), and the share of tokens
that were accepted guesses. A runner that fails is reported as such. exo's batched
engine runs on PyPI's mlx-lm through the venv's shim (``tests/helpers/exo1_mlx_lm_compat.py``).
Timings mean something only on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

ENGINES = {  # runner name: the environment its process gets
    "exo-sequential": {"EXO_MEDUSA": "off", "EXO_NO_BATCH": "1"},
    "exo-batched": {"EXO_MEDUSA": "off", "EXO_NO_BATCH": ""},
    "medusa-sequential": {"EXO_NO_BATCH": "1"},
    "medusa-batched": {"EXO_NO_BATCH": ""},
}
TARGET_C1, TARGET_BATCHED = 1.3, 1.0  # issue 31's: vs exo's plain engine at concurrency 1; vs exo batched


def plan(args, prompts: list[str], ports: list[int]) -> dict:
    from exo_medusa_mlx.default_model import DEFAULT_MODEL_ID

    def request(tag: str, i: int, prompt: str) -> dict:
        return {"name": f"{tag}-{i}", "prompt": prompt, "max_output_tokens": args.max_tokens, "temperature": 0.0}

    requests = []
    for c in args.concurrency:
        for g in range(0, len(prompts), c):
            group = [request(f"c{c}", g + k, p) for k, p in enumerate(prompts[g : g + c])]
            requests += group if c == 1 else [group]
    runners = [{"name": name, "model_id": DEFAULT_MODEL_ID, "n_layers": 30, "hidden_size": 576, "env": env,
                "requests": requests} for name, env in ENGINES.items()]
    return {"ports": ports, "runners": runners, "keep_going": True}


def throughput(requests: dict, concurrency: int, n: int) -> dict:
    """Tokens per second at ``concurrency``: each group's tokens over its wall time, summed."""
    tokens = seconds = accepted = steps_tokens = 0.0
    for g in range(0, n, concurrency):
        group = [requests[f"c{concurrency}-{k}"] for k in range(g, min(g + concurrency, n))]
        tokens += sum(len(r["tokens"]) for r in group)
        seconds += max(r["seconds"] for r in group)
        for r in group:
            details = r["usage"]["completion_tokens_details"]
            accepted += details["accepted_prediction_tokens"]
            steps_tokens += len(r["tokens"])
    return {"tok_s": tokens / seconds, "tokens": int(tokens), "seconds": seconds,
            "accepted_share": accepted / steps_tokens if steps_tokens else 0.0}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    p.add_argument("--json", default=None, help="write the raw results here too")
    args = p.parse_args(argv)
    from exo_medusa_mlx.core.machine import free_ports
    from exo_medusa_mlx.training.prompts import bench_prompts
    from helpers.exo1_plan import run_plan, venv_reason

    if (why := venv_reason()) is not None:
        sys.exit(f"error: {why}")
    prompts = [x["prompt"] for x in bench_prompts()[: args.prompts]]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            out = run_plan(plan(args, prompts, free_ports(2)), Path(tmp))
        except RuntimeError as e:
            sys.exit(f"error: {e}")
    if args.json:
        Path(args.json).write_text(json.dumps(out))
    report(out, args, len(prompts))


def ratio(a: dict, b: dict, c: int) -> float | None:
    """a's tokens per second over b's at concurrency ``c``; None where either failed."""
    return a[c]["tok_s"] / b[c]["tok_s"] if c in a and c in b and b[c]["tok_s"] > 0 else None


def report(out: dict, args, n: int) -> None:
    rows = {}
    for name in ENGINES:
        r = out["runners"][name]
        rows[name] = {"error": r["error"]} if "error" in r else \
            {c: throughput(r["requests"], c, n) for c in args.concurrency}
    print(f"exo 1.x runner, default model, {n} prompts x {args.max_tokens} tokens max, greedy (tokens/s)")
    print(f"{'concurrency':>12}" + "".join(f"{name:>19}" for name in ENGINES))
    for c in args.concurrency:
        cells = [f"{v[c]['tok_s']:>19.2f}" if c in v else f"{'failed':>19}" for v in rows.values()]
        print(f"{c:>12}" + "".join(cells))
    for name, v in rows.items():
        if "error" in v:
            print(f"{name}: failed: {v['error'][:300]}")
    seq, batch = rows["exo-sequential"], rows["exo-batched"]
    med_seq, med_batch = rows["medusa-sequential"], rows["medusa-batched"]
    first, last = args.concurrency[0], args.concurrency[-1]
    checks = [(f"concurrency {first}: Medusa sequential / exo sequential", ratio(med_seq, seq, first), TARGET_C1),
              (f"concurrency {first}: Medusa batched / exo batched", ratio(med_batch, batch, first), TARGET_C1),
              (f"concurrency {last}: Medusa batched / exo batched", ratio(med_batch, batch, last), TARGET_BATCHED)]
    for what, x, target in checks:
        verdict = "n/a" if x is None else ("met" if x >= target else "NOT met")
        shown = "failed" if x is None else f"{x:.2f}x"
        print(f"{what}: {shown} (target >= {target}x: {verdict})")
    for name in ("medusa-sequential", "medusa-batched"):
        if "error" not in rows[name]:
            shares = ", ".join(f"{rows[name][c]['accepted_share']:.0%} at {c}" for c in args.concurrency)
            print(f"{name}: accepted guesses among the tokens: {shares}")


if __name__ == "__main__":
    main()
