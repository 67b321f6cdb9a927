"""Drive exo 1.x's own runners as exo's worker does, for the tests and the bench (Python 3.13, exo's venv).

    python exo1_driver.py plan.json > result.json

The plan names runners (a model, 1 or 2 ranks on loopback, environment variables for
the runner processes, whether ``install()`` is in effect) and the requests each serves;
the result holds, per request, the tokens, text and chunks exo's runner sent back, and
the runners' ``exo-medusa`` log lines. Everything exo does here is exo's own code:
``RunnerSupervisor`` spawns ``bootstrap.entrypoint``'s runner (``runner_entrypoint``
under ``install()``), tasks go in the order exo's ``worker/plan.py`` sends them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import anyio
from loguru import logger

from exo.shared.models.model_cards import ModelCard, ModelTask, card_cache
from exo.shared.types.backends import Backend
from exo.shared.types.chunks import ErrorChunk, PrefillProgressChunk, TokenChunk, ToolCallChunk
from exo.shared.types.common import CommandId, Host, ModelId, NodeId
from exo.shared.types.events import ChunkGenerated, TaskStatusUpdated
from exo.shared.types.memory import Memory
from exo.shared.types.tasks import (ConnectToGroup, LoadModel, Shutdown, StartWarmup, TaskId, TaskStatus,
                                    TextGeneration)
from exo.shared.types.text_generation import InputMessage, InputMessageContent, TextGenerationTaskParams
from exo.shared.types.worker.instances import BoundInstance, InstanceId, MlxRingInstance
from exo.shared.types.worker.runners import (RunnerConnected, RunnerFailed, RunnerId, RunnerLoaded, RunnerReady,
                                             ShardAssignments)
from exo.shared.types.worker.shards import PipelineShardMetadata
from exo.utils.channels import channel
from exo.worker.runner import supervisor as exo_supervisor
from exo.worker.runner.supervisor import RunnerSupervisor

LOAD_TIMEOUT_S = 300  # a runner that does not answer fails the run instead of hanging it

LOG: list[str] = []


def log_sink(message) -> None:
    """The driver's log sink, picklable by name (the runners get the logger pickled): our lines
    go to stderr, from which exo's supervisor forwards a runner's to this process's logger."""
    text = str(message).rstrip()
    if "exo-medusa" in text:
        LOG.append(text)
        print(text, file=sys.stderr, flush=True)


def card_for(spec: dict) -> ModelCard:
    return ModelCard(model_id=ModelId(spec["model_id"]), storage_size=Memory.from_mb(spec.get("mb", 300)),
                     n_layers=spec["n_layers"], hidden_size=spec.get("hidden_size", 64), supports_tensor=False,
                     tasks=[ModelTask.TextGeneration], backends=[Backend.MlxCpu],
                     sampling_defaults=spec.get("sampling_defaults", {}))


def bound_instances(spec: dict, ports: list[int]) -> list[BoundInstance]:
    """Every rank's ``BoundInstance`` of one instance: layers split evenly, a ring on loopback."""
    card, ranks, n = card_for(spec), spec.get("ranks", 1), spec["n_layers"]
    cuts = [round(n * r / ranks) for r in range(ranks + 1)]
    nodes = [NodeId(f"node-{spec['name']}-{r}") for r in range(ranks)]
    runners = [RunnerId(f"runner-{spec['name']}-{r}") for r in range(ranks)]
    shards = {runners[r]: PipelineShardMetadata(model_card=card, device_rank=r, world_size=ranks,
                                                start_layer=cuts[r], end_layer=cuts[r + 1], n_layers=n)
              for r in range(ranks)}
    hosts = [Host(ip="127.0.0.1", port=p) for p in ports[:ranks]]
    instance = MlxRingInstance(
        instance_id=InstanceId(f"instance-{spec['name']}"),
        shard_assignments=ShardAssignments(model_id=card.model_id, node_to_runner=dict(zip(nodes, runners)),
                                           runner_to_shard=shards),
        hosts_by_node={node: hosts for node in nodes}, ephemeral_port=ports[0])
    return [BoundInstance(instance=instance, bound_runner_id=runners[r], bound_node_id=nodes[r])
            for r in range(ranks)]


class Events:
    """The runners' events, as exo's worker receives them."""

    def __init__(self, receiver):
        self.receiver = receiver
        self.chunks: dict[CommandId, list] = {}
        self.completed: dict[TaskId, int] = {}  # ranks that reported the task complete

    async def pump(self) -> None:
        async for event in self.receiver:
            if isinstance(event, ChunkGenerated):
                self.chunks.setdefault(event.command_id, []).append((time.perf_counter(), event.chunk))
            elif isinstance(event, TaskStatusUpdated) and event.task_status == TaskStatus.Complete:
                self.completed[event.task_id] = self.completed.get(event.task_id, 0) + 1

    async def finished(self, task_id: TaskId, sups: list[RunnerSupervisor]) -> None:
        """Every rank's runner is done with the task (rank 0's last chunk came before its own report)."""
        while self.completed.get(task_id, 0) < len(sups):
            failed = [s.status for s in sups if isinstance(s.status, RunnerFailed)]
            if failed:
                raise RuntimeError(f"runner failed: {failed[0].error_message}")
            await anyio.sleep(0.002)


async def wait_status(sups: list[RunnerSupervisor], status: type) -> None:
    with anyio.fail_after(LOAD_TIMEOUT_S):
        while not all(isinstance(s.status, status) for s in sups):
            failed = [s.status for s in sups if isinstance(s.status, RunnerFailed)]
            if failed:
                raise RuntimeError(f"runner failed: {failed[0].error_message}")
            await anyio.sleep(0.02)


def params_for(spec: dict, req: dict) -> TextGenerationTaskParams:
    fields = {k: v for k, v in req.items() if k not in ("name", "prompt", "cancel_after", "card_defaults", "at")}
    p = TextGenerationTaskParams(model=ModelId(spec["model_id"]),
                                 input=[InputMessage(role="user", content=InputMessageContent(req["prompt"]))],
                                 **fields)
    return p.with_card_sampling_defaults() if req.get("card_defaults") else p


def summary(chunks: list, t0: float) -> dict:
    tokens = [c for _, c in chunks if isinstance(c, TokenChunk)]
    last = tokens[-1] if tokens else None
    return {
        "tokens": [c.token_id for c in tokens],
        "text": "".join(c.text for c in tokens),
        "finish": last.finish_reason if last else None,
        "usage": last.usage.model_dump() if last is not None and last.usage is not None else None,
        "logprobs": [c.logprob for c in tokens],
        "top_logprobs": [[t.token for t in c.top_logprobs or []] for c in tokens],
        "thinking": [c.is_thinking for c in tokens],
        "errors": [c.error_message for _, c in chunks if isinstance(c, ErrorChunk)],
        "tool_calls": [[t.model_dump() for t in c.tool_calls] for _, c in chunks if isinstance(c, ToolCallChunk)],
        "prefill": [[c.processed_tokens, c.total_tokens] for _, c in chunks if isinstance(c, PrefillProgressChunk)],
        "seconds": (chunks[-1][0] - t0) if chunks else None,
        "first_token_s": next((t - t0 for t, c in chunks if isinstance(c, TokenChunk)), None),
    }


async def start_all(sups: list[RunnerSupervisor], task) -> None:
    """Hand every rank the task at once: a rank that joins the ring holds its GIL until all have
    joined, so its acknowledgement can wait on the others' tasks."""
    with anyio.fail_after(LOAD_TIMEOUT_S):
        async with anyio.create_task_group() as tg:
            for s in sups:
                tg.start_soon(s.start_task, task)


async def serve(sups: list[RunnerSupervisor], events: Events, spec: dict, req: dict, instance_id) -> dict:
    task = TextGeneration(instance_id=instance_id, command_id=CommandId(), task_params=params_for(spec, req))
    t0 = time.perf_counter()
    await start_all(sups, task)  # exo hands every rank the same task
    if "cancel_after" in req:
        with anyio.fail_after(LOAD_TIMEOUT_S):
            while sum(isinstance(c, TokenChunk) for _, c in events.chunks.get(task.command_id, [])) \
                    < req["cancel_after"]:
                await anyio.sleep(0.005)
        async with anyio.create_task_group() as tg:
            for s in sups:
                tg.start_soon(s.cancel_task, task.task_id)
    with anyio.fail_after(LOAD_TIMEOUT_S):
        await events.finished(task.task_id, sups)
    sampling = task.task_params.model_dump(include={"temperature", "top_p", "top_k", "min_p", "seed"},
                                           exclude_none=True)
    return {**summary(events.chunks.get(task.command_id, []), t0), "sampling": sampling}


async def run_runner(spec: dict, ports: list[int]) -> dict:
    env = spec.get("env", {})
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the runner processes inherit it at spawn
    try:
        return await _run_runner(spec, ports)
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def _run_runner(spec: dict, ports: list[int]) -> dict:
    if spec.get("sampling_defaults"):
        card_cache.cc[ModelId(spec["model_id"])] = card_for(spec)
    instances = bound_instances(spec, ports)
    sender, receiver = channel()
    events = Events(receiver)
    sups = [await RunnerSupervisor.create(bound_instance=b, event_sender=sender.clone()) for b in instances]
    out: dict = {"requests": {}}
    async with anyio.create_task_group() as tg:
        tg.start_soon(events.pump)
        for s in sups:
            tg.start_soon(s.run)
        iid = instances[0].instance.instance_id
        if len(sups) > 1:
            await start_all(sups, ConnectToGroup(instance_id=iid))
            await wait_status(sups, RunnerConnected)
        t0 = time.perf_counter()
        await start_all(sups, LoadModel(instance_id=iid))
        await wait_status(sups, RunnerLoaded)
        await start_all(sups, StartWarmup(instance_id=iid))
        await wait_status(sups, RunnerReady)
        out["ready_s"] = time.perf_counter() - t0
        for group in spec["requests"]:  # a list: served one after another; a list of lists: at once
            if isinstance(group, dict):
                out["requests"][group["name"]] = await serve(sups, events, spec, group, iid)
                continue
            results = {}

            async def one(req):
                results[req["name"]] = await serve(sups, events, spec, req, iid)

            async with anyio.create_task_group() as batch:
                for req in group:
                    batch.start_soon(one, req)
            out["requests"].update(results)
        for s in sups:
            await s.start_task(Shutdown(instance_id=iid, runner_id=s.bound_instance.bound_runner_id))
        for s in sups:
            await s.runner_process.wait()
            s.shutdown()
        sender.close()
    return out


async def main(plan: dict) -> dict:
    logger.remove()
    logger.add(log_sink, level="INFO", format="{message}")
    if plan.get("install", True):
        sys.path.insert(0, plan["project"])
        from exo_medusa_mlx.exo1 import install

        install(quiet=True)
    out = {"entrypoint": f"{exo_supervisor.entrypoint.__module__}.{exo_supervisor.entrypoint.__name__}",
           "runners": {}}
    for spec in plan["runners"]:
        LOG.clear()
        try:
            res = await run_runner(spec, plan["ports"])
        except Exception as e:  # the bench reports a runner that fails and goes on with the next
            if not plan.get("keep_going"):
                raise
            while isinstance(e, BaseExceptionGroup) and e.exceptions:  # anyio's task groups wrap it
                e = e.exceptions[0]
            res = {"error": f"{type(e).__name__}: {e}"}
        res["log"] = list(LOG)
        out["runners"][spec["name"]] = res
    return out


if __name__ == "__main__":
    plan = json.loads(Path(sys.argv[1]).read_text())
    result = anyio.run(main, plan)
    print(json.dumps(result))
