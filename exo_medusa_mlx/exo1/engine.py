"""exo 1.x's ``Builder`` and ``Engine`` with Medusa decoding, over exo's own loaded and sharded model.

``MedusaBuilder`` wraps exo's ``MlxBuilder``: that one joins the group, loads and
shards the model (pipeline or tensor) as exo does; ``build`` puts the heads beside
the model and returns a ``MedusaEngine``. The engine takes one task at a time, as
exo's ``SequentialGenerator`` does, and decodes it with ``stream_generate`` on every
rank (SPMD); rank 0 yields the chunks. Ranks agree on task order and cancellations
by all-gathering task ids. Each finished request reports its Medusa acceptance in
``usage.completion_tokens_details`` (``accepted_prediction_tokens``: guessed tokens
kept; ``rejected_prediction_tokens``: guessed tokens verified and dropped).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import mlx.core as mx
import numpy as np

from exo.api.types import CompletionTokensDetails, GenerationStats, PromptTokensDetails, Usage
from exo.shared.types.chunks import ErrorChunk, TokenChunk
from exo.shared.types.events import ChunkGenerated
from exo.shared.types.memory import Memory
from exo.shared.types.tasks import CANCEL_ALL_TASKS, TaskId, TextGeneration
from exo.shared.types.worker.runner_response import CancelledResponse, FinishedResponse
from exo.worker.engines.base import Builder, Engine
from exo.worker.engines.mlx.constants import MAX_TOKENS
from exo.worker.engines.mlx.utils_mlx import apply_chat_template

from ..distributed import DEFAULT_TIMEOUT_S, Comm, Watchdog, check_agreement
from ..generate import stream_generate
from ..core.heads_format import default_tree_for
from ..core.dynamic import checked_spec
from ..core.latency import tuned_facts
from ..core.tree import ROOT_ONLY
from ..heads import load_heads
from ..model import MedusaModel

# exo's sampling defaults (mlx_generate), so a task decodes from the same distribution.
DEFAULT_TEMPERATURE, DEFAULT_SEED = 0.7, 42
UNSUPPORTED = ("top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "logprobs")
ID_BYTES = 64  # a task id (a uuid: 36) as UTF-8, padded, for the all-gather
WARMUP_PROMPT = "Prompt to warm up the inference engine. Repeat this."


def attach_heads(base, heads: str | Path | None, tree=None, model_id: str | None = None) -> MedusaModel:
    """exo's loaded (and sharded) mlx-lm model with Medusa heads beside it; no heads: plain decoding."""
    if heads is None:
        return MedusaModel(base, None, ROOT_ONLY, model_id=model_id)
    dtype = base.model.norm.weight.dtype
    medusa_heads = load_heads(heads, base.args.hidden_size, base.args.vocab_size, dtype=dtype)
    tuned = default_tree_for(Path(heads))
    return MedusaModel(base, medusa_heads, checked_spec(tree if tree is not None else tuned), model_id=model_id,
                       facts=tuned_facts(tuned))


def agree_ids(comm: Comm | None, ids: list[str]) -> list[str]:
    """The ids every rank holds, in one order on every rank (sorted), as exo agrees on tasks."""
    if comm is None:
        return list(ids)
    raw = [i.encode() for i in ids]
    if any(len(r) > ID_BYTES for r in raw):
        raise ValueError(f"task id longer than {ID_BYTES} bytes: {ids}")
    counts = comm.all_gather(mx.array([len(ids)], dtype=mx.int32), "agreeing on tasks").tolist()
    width = max(counts)
    if width == 0:
        return []
    mine = np.zeros((width, ID_BYTES), dtype=np.uint8)
    for row, r in zip(mine, raw):
        row[: len(r)] = np.frombuffer(r, dtype=np.uint8)
    got = np.array(comm.all_gather(mx.array(mine), "agreeing on tasks")).reshape(comm.size, width, ID_BYTES)
    held = [{bytes(row).rstrip(b"\0").decode() for row in rank[:n]} for rank, n in zip(got, counts)]
    return sorted(set.intersection(*held))


@dataclass(eq=False)
class _Active:
    task: TextGeneration
    responses: Iterator  # stream_generate's GenerationResponses
    stop: list[str]
    text: str = ""
    tokens: list[int] = field(default_factory=list)


@dataclass(eq=False)
class MedusaEngine(Engine):
    """exo's ``Engine``: ``submit`` tasks, call ``step`` until each yields its ``FinishedResponse``."""

    model: MedusaModel
    tokenizer: Any
    group: mx.distributed.Group | None
    model_id: str
    device_rank: int
    cancel_receiver: Any
    event_sender: Any
    max_kv_size: int | None = None
    check_for_cancel_every: int = 16  # tokens between cancellation checks (an all-gather each)
    timeout_s: float = DEFAULT_TIMEOUT_S

    _cancelled_tasks: set[TaskId] = field(default_factory=set, init=False)
    _maybe_queue: list[TextGeneration] = field(default_factory=list, init=False)
    _maybe_cancel: list[TaskId] = field(default_factory=list, init=False)
    _all_tasks: dict[TaskId, TextGeneration] = field(default_factory=dict, init=False)
    _queue: deque = field(default_factory=deque, init=False)
    _active: _Active | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._comm = None
        if self.group is not None and self.group.size() > 1:
            self._comm = Comm(self.group, Watchdog(self.group.rank(), self.timeout_s))

    def warmup(self) -> None:
        prompt = self.tokenizer.encode(WARMUP_PROMPT)
        for _ in stream_generate(self.model, self.tokenizer, prompt, max_tokens=8, max_kv_size=self.max_kv_size):
            pass
        if self._comm is not None:
            self._comm.barrier("warming up")

    def submit(self, task: TextGeneration) -> None:
        if not isinstance(task, TextGeneration):
            raise ValueError(f"the Medusa engine decodes text tasks, got {type(task).__name__}")
        self._cancelled_tasks.discard(CANCEL_ALL_TASKS)
        self._all_tasks[task.task_id] = task
        self._maybe_queue.append(task)

    def step(self) -> list[tuple[TaskId, Any]]:
        out: list[tuple[TaskId, Any]] = []
        if self._active is None:
            self._agree_on_tasks()
            while self._active is None and self._queue:
                task = self._queue.popleft()
                if self.should_cancel(task.task_id):  # cancelled while queued: done, as exo ends it
                    out.append((task.task_id, FinishedResponse()))
                else:
                    out += self._start(task)
        if self._active is not None:
            out += self._advance()
        out += [(t, CancelledResponse()) for t in self._cancelled_tasks]
        # Every rank decodes; rank 0 alone hands the chunks to exo.
        return [(t, r) for t, r in out if self.device_rank == 0 or isinstance(r, (FinishedResponse, CancelledResponse))]

    def close(self) -> None:
        del self.model, self.tokenizer, self.group

    def serve_prefill(self, request, wfile: BinaryIO) -> None:
        raise ValueError("the Medusa engine does not serve disaggregated prefill (its tree cache is not exo's KV "
                         "format): leave exo's disaggregation off for this runner")

    # ----------------------------------------------------------------------- agreement

    def _agree_on_tasks(self) -> None:
        agreed = agree_ids(self._comm, [t.task_id for t in self._maybe_queue])
        self._queue.extend(self._all_tasks[i] for i in agreed)
        self._maybe_queue = [t for t in self._maybe_queue if t.task_id not in agreed]

    def _agree_on_cancellations(self) -> None:
        cancel_all = False
        for task_id in self.cancel_receiver.collect():
            if task_id == CANCEL_ALL_TASKS:
                cancel_all = True
            elif task_id in self._all_tasks:
                self._maybe_cancel.append(task_id)
        if self._comm is not None:
            cancel_all = self._comm.all_sum(mx.array(int(cancel_all)), "agreeing on cancellations").item() > 0
        if cancel_all:
            self._cancelled_tasks.add(CANCEL_ALL_TASKS)
        agreed = agree_ids(self._comm, list(self._maybe_cancel))
        self._cancelled_tasks.update(TaskId(i) for i in agreed)
        self._maybe_cancel = [t for t in self._maybe_cancel if t not in agreed]

    # ----------------------------------------------------------------------- decoding

    def _start(self, task: TextGeneration) -> list:
        p = task.task_params
        bad = [name for name in UNSUPPORTED if getattr(p, name, None) not in (None, False, 0)]
        if bad:
            return self._refuse(task, f"the Medusa engine samples with temperature and top_p only; unset {', '.join(bad)}")
        prompt = apply_chat_template(self.tokenizer, p)
        responses = stream_generate(
            self.model, self.tokenizer, prompt, max_tokens=p.max_output_tokens or MAX_TOKENS,
            temp=p.temperature if p.temperature is not None else DEFAULT_TEMPERATURE,
            top_p=p.top_p if p.top_p is not None else 1.0, seed=p.seed if p.seed is not None else DEFAULT_SEED,
            max_kv_size=self.max_kv_size)
        stop = [p.stop] if isinstance(p.stop, str) else list(p.stop or [])
        self._active = _Active(task, responses, stop)
        return []

    def _refuse(self, task: TextGeneration, message: str) -> list:
        return [(task.task_id, ErrorChunk(model=self.model_id, error_message=message)), (task.task_id, FinishedResponse())]

    def _advance(self) -> list:
        a = self._active
        try:
            r = next(a.responses)
        except StopIteration:
            self._active = None
            return [(a.task.task_id, FinishedResponse())]
        except Exception as e:
            self._active = None
            if self.device_rank == 0:
                self.event_sender.send(ChunkGenerated(command_id=a.task.command_id,
                                                      chunk=ErrorChunk(model=self.model_id, error_message=str(e))))
            raise
        a.tokens.append(r.token)
        text, finish = self._apply_stop(a, r.text, r.finish_reason)
        chunk = TokenChunk(model=self.model_id, text=text, token_id=r.token, finish_reason=finish,
                           usage=self._usage(r) if finish else None, stats=self._stats(r) if finish else None)
        out = [(a.task.task_id, chunk)]
        if finish:
            self._active = None
            if self._comm is not None:
                check_agreement(self._comm, a.tokens)
            return out + [(a.task.task_id, FinishedResponse())]
        if len(a.tokens) % self.check_for_cancel_every == 0:  # at the same token on every rank
            self._agree_on_cancellations()
            if self.should_cancel(a.task.task_id):
                self._active = None
                out.append((a.task.task_id, FinishedResponse()))
        return out

    @staticmethod
    def _apply_stop(a: _Active, text: str, finish: str | None) -> tuple[str, str | None]:
        """Cut the text before the first stop string that completes, as exo does."""
        before = len(a.text)
        a.text += text
        hits = [i for i in (a.text.find(s) for s in a.stop) if i >= 0]
        if not hits:
            return text, finish
        return a.text[before : max(before, min(hits))], "stop"

    def _usage(self, r) -> Usage:
        verified = round(r.mean_accepted * r.steps)  # tokens the verification steps emitted
        accepted = max(verified - r.steps, 0)  # all but each step's bonus token were guesses kept
        guessed = round(r.steps * (r.mean_tree_size - 1)) if self.model.heads is not None else 0
        return Usage(prompt_tokens=r.prompt_tokens, completion_tokens=r.generation_tokens,
                     total_tokens=r.prompt_tokens + r.generation_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=0),
                     completion_tokens_details=CompletionTokensDetails(
                         accepted_prediction_tokens=accepted, rejected_prediction_tokens=max(guessed - accepted, 0)))

    @staticmethod
    def _stats(r) -> GenerationStats:
        return GenerationStats(prompt_tps=float(r.prompt_tps), generation_tps=float(r.generation_tps),
                               prompt_tokens=r.prompt_tokens, generation_tokens=r.generation_tokens,
                               peak_memory_usage=Memory.from_gb(r.peak_memory))


@dataclass
class MedusaBuilder(Builder):
    """exo's ``Builder`` around exo's own ``MlxBuilder`` (``inner``), which connects, loads and shards."""

    inner: Any
    heads: str | Path | None = None
    tree: Any = None
    max_kv_size: int | None = None

    def connect(self, bound_instance) -> None:
        self.inner.connect(bound_instance)

    def load(self, bound_instance):
        yield from self.inner.load(bound_instance)

    def build(self) -> MedusaEngine:
        inner = self.inner
        if inner.inference_model is None or inner.tokenizer is None:
            raise ValueError("MedusaBuilder.build before load: the model is not loaded")
        model = attach_heads(inner.inference_model, self.heads, self.tree, model_id=str(inner.model_id))
        group = inner.group
        return MedusaEngine(model=model, tokenizer=inner.tokenizer, group=group, model_id=inner.model_id,
                            device_rank=0 if group is None else group.rank(), cancel_receiver=inner.cancel_receiver,
                            event_sender=inner.event_sender, max_kv_size=self.max_kv_size)

    def close(self) -> None:
        self.inner.close()
