"""Medusa inside exo 1.x's own runner vs exo's plain engines, measured side by side in one run.

    python scripts/bench_exo1.py [--prompts 8] [--max-tokens 128] [--concurrency 1 4] [--json out.json]

Runs, one after another in one process of exo's venv (``scripts/setup_exo1.sh``), three
runners of the default model through exo's ``RunnerSupervisor`` (``tests/helpers/exo1_driver.py``):
exo's ``SequentialGenerator`` (``EXO_NO_BATCH=1``), exo's ``BatchGenerator`` (its default) and
Medusa (``install()``); each serves the same greedy requests (the bench prompts, the chat
template) one at a time and in groups of N at once. Prints generated tokens per second
(all of a group's tokens over the group's wall time), the ratio to each exo engine, and
Medusa's tokens per verification step. A runner that fails is reported as such (with
PyPI's mlx-lm exo's BatchGenerator fails on its second request). Timings mean something
only on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENGINES = {  # runner name: the environment its process gets
    "exo-sequential": {"EXO_MEDUSA": "off", "EXO_NO_BATCH": "1"},
    "exo-batched": {"EXO_MEDUSA": "off", "EXO_NO_BATCH": ""},
    "medusa": {"EXO_NO_BATCH": "1"},
}


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
    return {"project": str(ROOT), "ports": ports, "runners": runners, "keep_going": True}


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
    from exo_medusa_mlx.training.prompts import bench_prompts
    from exo_medusa_mlx.core.machine import free_ports
    from exo_medusa_mlx.default_model import DEFAULT_MODEL_ID, default_model_path

    home = Path(os.environ.get("EXO1_HOME", Path.home() / ".cache" / "exo_medusa_mlx" / "exo1"))
    python = home / "venv" / "bin" / "python"
    if not python.exists():
        sys.exit(f"error: no exo 1.x venv at {python.parent.parent}: run scripts/setup_exo1.sh first")
    prompts = [x["prompt"] for x in bench_prompts()[: args.prompts]]
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        models.mkdir()
        (models / DEFAULT_MODEL_ID.replace("/", "--")).symlink_to(default_model_path())
        plan_file = Path(tmp) / "plan.json"
        plan_file.write_text(json.dumps(plan(args, prompts, free_ports(2))))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "EXO_HOME": str(Path(tmp) / "home"), "EXO_DASHBOARD_DIR": tmp,
               "EXO_DEFAULT_MODELS_DIR": str(models), "HF_HUB_OFFLINE": "1"}
        run = subprocess.run([str(python), str(ROOT / "tests" / "helpers" / "exo1_driver.py"), str(plan_file)],
                             env=env, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"error: the driver failed:\n{run.stderr[-3000:]}")
    out = json.loads(run.stdout)
    if args.json:
        Path(args.json).write_text(json.dumps(out))
    report(out, args, len(prompts))


def report(out: dict, args, n: int) -> None:
    rows = {}
    for name in ENGINES:
        r = out["runners"][name]
        rows[name] = {"error": r["error"]} if "error" in r else \
            {c: throughput(r["requests"], c, n) for c in args.concurrency}
    print(f"exo 1.x runner, default model, {n} prompts x {args.max_tokens} tokens max, greedy (tokens/s)")
    print(f"{'concurrency':>12} {'exo seq':>9} {'exo batch':>10} {'medusa':>8} {'vs seq':>7} {'vs batch':>9}")
    for c in args.concurrency:
        cell = {k: (v[c]["tok_s"] if c in v else None) for k, v in rows.items()}
        seq, batch, med = cell["exo-sequential"], cell["exo-batched"], cell["medusa"]

        def fmt(x, w, ratio=False):
            return f"{'failed':>{w}}" if x is None else f"{x:>{w}.2f}" + ("x" if ratio else "")

        print(f"{c:>12} {fmt(seq, 9)} {fmt(batch, 10)} {fmt(med, 8)} "
              f"{fmt(med / seq if med and seq else None, 6, True)} {fmt(med / batch if med and batch else None, 8, True)}")
    for name, v in rows.items():
        if "error" in v:
            print(f"{name}: failed: {v['error'][:300]}")
    med = rows["medusa"]
    if "error" not in med:
        c = args.concurrency[0]
        print(f"medusa: {med[c]['accepted_share']:.0%} of the tokens were accepted guesses")


if __name__ == "__main__":
    main()
