"""exo 1.x's continuous batching with Medusa: exo's ``BatchGenerator``, the batched Medusa step inside.

exo's ``BatchGenerator`` (its default engine) keeps everything around the decoding:
the ranks agreeing on tasks and cancellations, up to ``EXO_MAX_CONCURRENT_REQUESTS``
tasks at once, exo's output parsers per task (tool calls, thinking tags), error chunks.
It drives an inner generator (``submit`` -> uid, ``step`` -> [(uid, GenerationResponse)],
``cancel``, ``has_work``, ``close``); ``MedusaBatch`` is that generator over
``core.step.batch_step``: one verification forward over every running task's tree per step.

As in exo's own: a task's prompt is prefilled when it is submitted, between two steps of
the running tasks, from exo's KV prefix cache where a kept prompt shares its start
(``prefix.py``); its first token goes out with the next step's tokens and it joins the
batch. Each row's ``Step``s become exo's responses exactly as for a task decoded alone
(``engine.Decode``: stop strings, usage, log-probabilities). Every rank runs the same
steps: on a pipeline the hidden states are all-gathered by exo's last layer; with tensor
parallelism exo's sharded linears take the batch as they take one sequence.

Trees shrink as the batch fills, by the same budget as the server's (``core.budget``): at
B tasks each row keeps its tree's most probable nodes, as many as give the most expected
tokens per unit of a batched step's cost (the heads' tuned batch table where it was measured
on this machine, else the default rule); a dynamic plan takes the batch's cost curve.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import mlx.core as mx

from exo.shared.types.text_generation import TextGenerationTaskParams
from exo.shared.types.worker.runner_response import GenerationResponse
from exo.worker.runner.llm_inference.batch_generator import BatchGenerator

from ..core.budget import BatchBudget
from ..core.dynamic import DynamicTree
from ..core.step import BatchVerifier, Sequence, Step, batch_step, context_end, prefill, start
from ..core.tree import TreeBuffers
from ..distributed import Comm, check_agreement
from ..model import MedusaModel
from .engine import Decode, MedusaParts, error_response, prefill_check, prepare, warm_up
from .prefix import PrefixCache

class _Row:
    """One task in the batch: its ``Step``s in, exo's responses out, as ``Decode.stream`` gives them
    for a task alone.

    The steps reach the stream through a queue (as exo's ``GeneratorQueue`` feeds its
    parsers): after a step of k tokens exactly k responses are taken, or fewer when the
    task ends, so the stream never asks for a step not yet made.
    """

    def __init__(self, uid: int, decode: Decode, medusa: MedusaModel, max_tokens: int, tic: float,
                 comm: Comm | None):
        self.uid, self.comm = uid, comm
        self.tokens: list[int] = []
        self.done = False
        self._steps: deque[Step] = deque()
        self._out = decode.stream(medusa, self._queued(), max_tokens, tic)

    def _queued(self) -> Iterator[Step]:
        while True:
            yield self._steps.popleft()

    def feed(self, step: Step) -> list[GenerationResponse]:
        """exo's responses for the tokens of ``step``; ``done`` once the task has ended."""
        self._steps.append(step)
        out = []
        for _ in step.tokens:
            r = next(self._out)
            out.append(r)
            self.tokens.append(r.token)
            if r.finish_reason is not None:
                self.done = True
                if self.comm is not None:  # at the same step on every rank
                    check_agreement(self.comm, self.tokens)
                break
        return out


@dataclass(eq=False)
class MedusaBatch:
    """exo's ``ExoBatchGenerator`` with Medusa: tasks decode together through ``batch_step``."""

    medusa: MedusaModel
    tokenizer: object
    prefix: PrefixCache
    comm: Comm | None = None
    _verifier: BatchVerifier = field(init=False)
    _rows: dict[Sequence, _Row] = field(default_factory=dict, init=False)  # the running tasks, by sequence
    _ready: dict[int, list[GenerationResponse]] = field(default_factory=dict, init=False)  # out at the next step
    _budget: BatchBudget = field(init=False)

    def __post_init__(self) -> None:
        self._verifier = BatchVerifier(self.medusa)
        self._budget = BatchBudget.for_model(self.medusa)
        self._uids = itertools.count()

    @property
    def has_work(self) -> bool:
        return bool(self._ready or self._rows)

    def submit(self, task_params: TextGenerationTaskParams, prompt: str,
               on_prefill_progress: Callable[[int, int], None] | None = None,
               distributed_prompt_progress_callback: Callable[[], None] | None = None,
               on_generation_token: Callable[[], None] | None = None) -> int:
        """Prefill a task's prompt (raises exo's ``PrefillCancelled`` when it is cancelled meanwhile);
        its first token goes out with the next ``step``. A refused task gets an error response."""
        uid = next(self._uids)
        try:
            job = prepare(self.medusa, self.tokenizer, task_params, prompt)
        except ValueError as e:
            self._ready[uid] = [error_response(str(e))]
            return uid
        tic = time.perf_counter()
        ids = job.ids
        ctx, caches, hit, index = self.prefix.load(ids, task_params)
        todo = len(ids) - hit
        h = prefill(self.medusa, ctx, caches, ids[hit:],
                    check=prefill_check(todo, on_prefill_progress, distributed_prompt_progress_callback))
        if on_prefill_progress is not None:
            on_prefill_progress(todo, todo)
        self.prefix.keep(ids, ctx, caches, hit, index, task_params, todo / max(time.perf_counter() - tic, 1e-9))
        tree = self._tree(len(self._rows) + 1)
        seq, first = start(self.medusa, ctx, h, job.policy, tree, len(ids) - 1,
                           context_end(self.medusa.max_context, None))
        decode = Decode(self.tokenizer, task_params, len(ids), job.policy.accept, on_generation_token, hit)
        row = _Row(uid, decode, self.medusa, job.max_tokens, tic, self.comm)
        self._ready[uid] = row.feed(Step(first, 0, seq.finish))
        if not row.done:
            self._verifier.join(seq, ctx, caches)
            self._rows[seq] = row
        return uid

    def step(self) -> list[tuple[int, GenerationResponse]]:
        """The first tokens of tasks submitted since the last step, then one batched Medusa step
        for the running tasks: one response per token, tasks that end leaving the batch."""
        out = [(uid, r) for uid, rs in self._ready.items() for r in rs]
        self._ready.clear()
        seqs = list(self._verifier.seqs)
        if not seqs:
            return out
        tree = self._tree(len(seqs))
        verified = [s.tree.size for s in seqs]
        for s in seqs:
            s.next_tree = tree
        gone = []
        for s, acc, size in zip(seqs, batch_step(self._verifier, seqs), verified):
            row = self._rows[s]
            out += [(row.uid, r) for r in row.feed(Step(acc.tokens, size, s.finish))]
            if row.done:
                gone.append(s)
        self._leave(gone)
        return out

    def cancel(self, uids: list[int]) -> None:
        """Drop tasks (exo's agreed cancellations); the others go on."""
        uids = set(uids)
        for uid in uids:
            self._ready.pop(uid, None)
        self._leave([s for s, row in self._rows.items() if row.uid in uids])

    def close(self) -> None:
        self._leave(list(self._rows))
        self._ready.clear()
        mx.clear_cache()

    def _leave(self, gone: list[Sequence]) -> None:
        if gone:
            self._verifier.leave(gone)
            for s in gone:
                del self._rows[s]

    def _tree(self, batch_size: int) -> TreeBuffers | DynamicTree:
        """The tree each row proposes in a batch of ``batch_size`` (``BatchBudget.tree_for``: one
        object per size, as the batch reads rows by tree)."""
        return self._budget.tree_for(batch_size, self.medusa.tree)


@dataclass(eq=False)
class MedusaBatchEngine(MedusaParts, BatchGenerator):
    """exo's ``BatchGenerator`` (its default engine) with ``MedusaBatch`` as its generator."""

    medusa: MedusaModel | None = None
    _comm: Comm | None = field(default=None, init=False)

    def __post_init__(self) -> None:  # not exo's: that one builds exo's own batch generator
        self._comm = self.comm()
        prefix = PrefixCache(self.kv_prefix_cache, self.model, self.medusa, self.tokenizer)
        self._gen = MedusaBatch(self.medusa, self.tokenizer, prefix, self._comm)

    def warmup(self) -> None:
        self.check_for_cancel_every = warm_up(self.medusa, self.tokenizer, self.model_id, self.group, self._comm)
