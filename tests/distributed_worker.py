"""One rank of tests/test_distributed.py: decode every case of a spec on a split model.

Run by ``exo_medusa_mlx.launch`` as ``python distributed_worker.py SPEC OUT_DIR``; each
rank writes ``OUT_DIR/rank{r}.json``: per case, the tokens it emitted and its steps.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

import exo_medusa_mlx  # noqa: E402

exo_medusa_mlx.setup_blas()  # before the first import of mlx
import numpy as np  # noqa: E402

from exo_medusa_mlx import distributed as dist  # noqa: E402
from exo_medusa_mlx.core.accept import make_policy  # noqa: E402
from exo_medusa_mlx.core.step import ROOT_ONLY, generate_step  # noqa: E402
from exo_medusa_mlx.loading import load  # noqa: E402
from tiny import OracleMedusa  # noqa: E402


def load_case(case: dict, comm=None):
    folder = Path(case["folder"])
    model, tokenizer = load(str(folder), heads=folder / "medusa", tree=case.get("tree", "cpu-8"), lazy=True)
    if comm is not None:
        dist.shard(model, comm, case["parallel"], dist.split_weights(case.get("split", "even"), comm))
        model = dist.agree_plan(comm, model)  # a dynamic tree's costs: rank 0's
    if case.get("future"):  # heads that know the greedy continuation: deep acceptance, gathered commits
        model = OracleMedusa(model.base, model.heads, model.tree, np.array(case["future"]), ranks=(0, 1, 2))
    return model, tokenizer


def decode(model, case: dict, prompt) -> dict:
    policy = make_policy(case.get("temp", 0.0), 1.0, "auto", case.get("seed"))
    tokens, steps = [], 0
    for s in generate_step(np.array(prompt), model, policy, tree=None if case["medusa"] else ROOT_ONLY,
                           max_kv_size=case.get("max_kv_size")):
        tokens += s.tokens
        steps += 1
        if len(tokens) >= case["n"]:
            return {"tokens": tokens[: case["n"]], "steps": steps}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    comm = dist.init(timeout_s=60)
    out = {}
    for case in spec["cases"]:
        model, _ = load_case(case, comm)
        out[case["name"]] = decode(model, case, spec["prompt"])
    Path(sys.argv[2], f"rank{comm.rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
