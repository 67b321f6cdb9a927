"""One rank of tests/test_distributed.py: decode every case of a spec on a split model.

Run by ``exo_medusa_mlx.launch`` as ``python tests/helpers/distributed_worker.py SPEC OUT_DIR``; each
rank writes ``OUT_DIR/rank{r}.json``: per case, the tokens it emitted and its steps.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: helpers

import exo_medusa_mlx  # noqa: E402,F401  (before mlx: the BLAS)
import numpy as np  # noqa: E402

from exo_medusa_mlx import distributed as dist  # noqa: E402
from exo_medusa_mlx.core.accept import make_policy  # noqa: E402
from exo_medusa_mlx.core.step import ROOT_ONLY, generate_step  # noqa: E402
from exo_medusa_mlx.loading import load  # noqa: E402
from helpers.tiny import OracleMedusa  # noqa: E402


def load_case(case: dict, comm=None):
    folder = Path(case["folder"])
    model, tokenizer = load(str(folder), heads=folder / "medusa", tree=case.get("tree", "cpu-8"), lazy=True)
    if comm is not None:
        dist.shard(model, comm, case["parallel"], dist.split_weights(case.get("split", "even"), comm))
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


def run_engine(case: dict, comm) -> dict:
    """exo 1.x's runner driving MedusaEngine over a split model (stand-in exo types)."""
    from helpers import exo1_standin as exo

    exo.install()
    from exo_medusa_mlx.exo1 import MedusaBuilder

    class TinyMlxBuilder:  # exo's MlxBuilder's fields; loads and splits the tiny model
        def __init__(self):
            self.model_id, self.event_sender, self.cancel_receiver = "tiny", exo.Sender(), exo.Receiver()
            self.inference_model = self.tokenizer = self.group = None

        def connect(self, bound_instance):
            self.group = comm.group

        def load(self, bound_instance):
            model, self.tokenizer = load(case["folder"], lazy=True)
            dist.shard(model, comm, case["parallel"])
            self.inference_model = model.base
            yield exo.ModelLoadingResponse(layers_loaded=len(model.base.model.layers), total=4)

        def close(self):
            pass

    builder = MedusaBuilder(TinyMlxBuilder(), heads=Path(case["folder"]) / "medusa", tree="cpu-8")
    builder.connect(None)
    list(builder.load(None))
    engine = builder.build()
    engine.warmup()
    params = exo.TextGenerationTaskParams(model="tiny", input=[exo.InputMessage(role="user", content=case["text"])],
                                          max_output_tokens=case["n"], temperature=0.0)
    # exo hands every rank the same task
    task = exo.TextGeneration(instance_id="i", command_id=exo.CommandId("c"), task_params=params,
                              task_id=exo.TaskId("t"))
    engine.submit(task)
    tokens, finished, chunks = [], False, 0
    while not finished:
        for task_id, r in engine.step():
            finished |= isinstance(r, exo.FinishedResponse)
            if isinstance(r, exo.TokenChunk):
                tokens.append(r.token_id)
                chunks += 1
    return {"tokens": tokens, "chunks": chunks}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    comm = dist.init(timeout_s=60)
    out = {}
    for case in spec["cases"]:
        if case.get("engine"):
            out[case["name"]] = run_engine(case, comm)
            continue
        model, _ = load_case(case, comm)
        out[case["name"]] = decode(model, case, spec["prompt"])
    Path(sys.argv[2], f"rank{comm.rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
