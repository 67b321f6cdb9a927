"""exo 1.x's engine with Medusa: exo's own ``SequentialGenerator``, each task decoded by the Medusa step.

``MedusaEngine`` is exo's ``SequentialGenerator`` with the generator it builds per task
replaced: ``medusa_generate`` yields exo's ``GenerationResponse``s as exo's
``mlx_generate`` does (same tokenisation, sampling controls and defaults, stop strings,
usage, stats, log-probabilities, prefill progress), decoded with ``core.step.generate_step``
over a ``MedusaModel`` built on exo's own loaded (and sharded) model. Everything around it
is exo's: ranks agreeing on tasks and cancellations, exo's output parsers (tool calls,
thinking tags, reasoning-token counts), error chunks. Every rank runs the same step on the
all-gathered hidden state (SPMD) with the task's seed, so the ranks draw alike.

The pieces a task needs whichever step decodes it (``prepare``, ``prefill_check``,
``Decode``, ``warm_up``, ``MedusaParts``) are shared with the batched engine
(``batch.py``: exo's ``BatchGenerator`` with the batched step, each row a ``Decode``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterable, Iterator

import mlx.core as mx
import numpy as np

from exo.api.types import CompletionTokensDetails, GenerationStats, PromptTokensDetails, Usage
from exo.shared.types.chunks import PrefillProgressChunk
from exo.shared.types.events import ChunkGenerated
from exo.shared.types.memory import Memory
from exo.shared.types.text_generation import InputMessage, InputMessageContent, TextGenerationTaskParams
from exo.shared.types.worker.runner_response import GenerationResponse
from exo.worker.engines.mlx.cache import encode_prompt
from exo.worker.engines.mlx.constants import DEFAULT_TOP_LOGPROBS, MAX_TOKENS
from exo.worker.engines.mlx.generator.generate import PrefillCancelled, eos_ids_from_tokenizer, extract_top_logprobs
from exo.worker.engines.mlx.utils_mlx import apply_chat_template, fix_unmatched_think_end_tokens, mx_barrier
from exo.worker.runner.llm_inference.batch_generator import SequentialGenerator, _check_for_debug_prompts

from ..core.accept import Policy
from ..core.generation import GenerationResponse as Response, stream_steps
from ..core.limits import LimitError
from ..core.processors import ProcessedAcceptor, Sampling, make_sampling_policy
from ..core.slots import PREFILL_STEP
from ..core.step import Step, generate_step
from ..core.tokens import eos_ids
from ..distributed import Comm, Watchdog, check_agreement
from ..model import MedusaModel

# exo's mlx_generate: its defaults where a request (and its model card) leave a control unset.
DEFAULT_TEMPERATURE, DEFAULT_MIN_P, DEFAULT_SEED = 0.7, 0.05, 42
EXO_REPETITION_CONTEXT = 20
WARMUP_PROMPT = "Prompt to warm up the inference engine. Repeat this."  # exo's
WARMUP_TOKENS, MAX_CANCEL_EVERY = 50, 100


def exo_sampling(p: TextGenerationTaskParams, banned: Iterable[int] = ()) -> Sampling:
    """The sampling controls exo's ``mlx_generate`` applies to a task, with exo's defaults.

    A top-p outside (0, 1) is none, as mlx-lm's ``make_sampler`` reads it; ``banned``:
    tokens exo bans for a bench request (its EOS ids).
    """
    top_p = p.top_p if p.top_p is not None and 0.0 < p.top_p < 1.0 else 1.0
    return Sampling(
        temp=p.temperature if p.temperature is not None else DEFAULT_TEMPERATURE, top_p=top_p,
        min_p=p.min_p if p.min_p is not None else DEFAULT_MIN_P, top_k=p.top_k or 0,
        repetition_penalty=p.repetition_penalty,
        repetition_context_size=p.repetition_context_size or EXO_REPETITION_CONTEXT,
        presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty, banned=tuple(banned))


@dataclass
class Prepared:
    """A task as the Medusa step takes it: exo's tokens, its output limit and its sampling policy."""

    ids: np.ndarray  # (n,) int64: the prompt, tokenised as exo's mlx_generate does
    max_tokens: int
    policy: Policy


def prepare(model: MedusaModel, tokenizer, task: TextGenerationTaskParams, prompt: str) -> Prepared:
    """exo's ``mlx_generate`` set-up of a task, for the Medusa step; ``ValueError`` where it is refused."""
    ids = np.array(fix_unmatched_think_end_tokens(encode_prompt(tokenizer, prompt), tokenizer), dtype=np.int64)
    max_tokens = task.max_output_tokens or MAX_TOKENS
    if model.max_context:  # the tree cache holds the context; exo's own engine would run past it
        max_tokens = min(max_tokens, model.max_context - len(ids))
    if max_tokens < 1:
        raise LimitError(f"prompt has {len(ids)} tokens, the model's context is {model.max_context}: shorten it")
    sampling = exo_sampling(task, eos_ids_from_tokenizer(tokenizer) if task.bench else ())
    # exo's decode loop starts from the prompt's last two tokens, so its penalties see those, then the output.
    policy = make_sampling_policy(sampling, ids[-2:].tolist(), task.seed or DEFAULT_SEED, task.logprobs)
    return Prepared(ids, max_tokens, policy)


def prefill_check(total: int, on_prefill_progress: Callable[[int, int], None] | None,
                  distributed_prompt_progress_callback: Callable[[], None] | None) -> Callable[[], None]:
    """What runs before each prefill chunk of ``total`` tokens, on every rank alike: exo's
    cancellation agreement (it raises ``PrefillCancelled``), then a progress chunk."""
    chunks = 0

    def check() -> None:
        nonlocal chunks
        if distributed_prompt_progress_callback is not None:
            distributed_prompt_progress_callback()
        if on_prefill_progress is not None:
            on_prefill_progress(min(chunks * PREFILL_STEP, total), total)
        chunks += 1

    return check


@dataclass
class Decode:
    """One task's decoding state, whichever step produces its ``Step``s (``generate_step`` alone,
    or a row of the batched step): exo's stop strings, log-probabilities, usage and stats."""

    tokenizer: object
    params: TextGenerationTaskParams
    prompt_tokens: int
    acceptor: object  # the policy's acceptor: a ProcessedAcceptor carries the log-probabilities
    on_generation_token: Callable[[], None] | None = None
    cached: int = 0  # prompt tokens taken from exo's KV prefix cache

    def stream(self, model: MedusaModel, steps: Iterable[Step], max_tokens: int, tic: float
               ) -> Iterator[GenerationResponse]:
        """exo's responses from a task's ``Step``s (``tic``: when its prefill began)."""
        ours = stream_steps(steps, self.prompt_tokens, eos_ids(self.tokenizer, model.eos_token_ids),
                            model.detokenizer(self.tokenizer), max_tokens, model.peak_memory_gb, tic)
        return self.responses(ours)

    def responses(self, ours: Iterable[Response]) -> Iterator[GenerationResponse]:
        """exo's responses from ``stream_steps``' (one per token, the EOS included, as exo counts)."""
        stops = [self.params.stop] if isinstance(self.params.stop, str) else list(self.params.stop or [])
        longest = max((len(s) for s in stops), default=0)
        text, seen_calls, row = "", -1, 0
        for n, r in enumerate(ours, start=1):
            text += r.text
            piece, finish = r.text, r.finish_reason
            hit = next((s for s in stops if s in text), None)
            if hit is not None:  # cut before the stop string, as exo does, even when it spans pieces
                piece, finish = text[: text.find(hit)][len(text) - len(r.text):], "stop"
            logprob = top = None
            if self.params.logprobs and isinstance(self.acceptor, ProcessedAcceptor):
                if self.acceptor.calls != seen_calls:  # a new step: its rows start again
                    seen_calls, row = self.acceptor.calls, 0
                logprob, top = extract_top_logprobs(mx.array(self.acceptor.logprobs[row]), self.tokenizer,
                                                    self.params.top_logprobs or DEFAULT_TOP_LOGPROBS, r.token)
                row += 1
            if self.on_generation_token is not None:
                self.on_generation_token()
            done = finish is not None
            yield GenerationResponse(text=piece, token=r.token, logprob=logprob, top_logprobs=top,
                                     finish_reason=finish, stats=self._stats(r) if done else None,
                                     usage=self._usage(r, n) if done else None)
            if done:
                return
            if longest and len(text) > longest:
                text = text[-longest:]

    def _usage(self, r: Response, completion: int) -> Usage:
        verified = round(r.mean_accepted * r.steps)  # tokens the verification steps emitted
        accepted = max(verified - r.steps, 0)  # all but each step's bonus token were guesses kept
        guessed = round(r.steps * (r.mean_tree_size - 1))  # a dynamic tree's size varies per step
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.prompt_tokens + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached),
                     completion_tokens_details=CompletionTokensDetails(
                         accepted_prediction_tokens=accepted,
                         rejected_prediction_tokens=max(guessed - accepted, 0)))

    def _stats(self, r: Response) -> GenerationStats:
        return GenerationStats(prompt_tps=float(r.prompt_tps), generation_tps=float(r.generation_tps),
                               prompt_tokens=self.prompt_tokens, generation_tokens=r.generation_tokens,
                               peak_memory_usage=Memory.from_gb(r.peak_memory))


def error_response(message: str) -> GenerationResponse:
    """A request refused before any work: exo's parsers turn it into an ``ErrorChunk``."""
    return GenerationResponse(text=message, token=0, finish_reason="error", usage=None)


def medusa_generate(model: MedusaModel, tokenizer, task: TextGenerationTaskParams, prompt: str, *,
                    on_prefill_progress: Callable[[int, int], None] | None = None,
                    distributed_prompt_progress_callback: Callable[[], None] | None = None,
                    on_generation_token: Callable[[], None] | None = None) -> Iterator[GenerationResponse]:
    """exo's ``mlx_generate`` for one task (its arguments less the prefix cache and vision), with Medusa."""
    try:
        job = prepare(model, tokenizer, task, prompt)
    except ValueError as e:
        yield error_response(str(e))
        return
    ids = job.ids
    check = prefill_check(len(ids), on_prefill_progress, distributed_prompt_progress_callback)

    def steps() -> Iterator[Step]:
        for step in generate_step(ids, model, job.policy, max_tokens=job.max_tokens, check=check):
            if step.tree_size == 0 and on_prefill_progress is not None:
                on_prefill_progress(len(ids), len(ids))
            yield step

    model.reset_peak_memory()
    decode = Decode(tokenizer, task, len(ids), job.policy.accept, on_generation_token)
    yield from decode.stream(model, steps(), job.max_tokens, time.perf_counter())


def warm_up(medusa: MedusaModel, tokenizer, model_id, group, comm: Comm | None) -> int:
    """Decode exo's warm-up prompt with Medusa; returns how many tokens to decode between
    cancellation checks (about a second's worth, as exo), the same on every rank."""
    params = TextGenerationTaskParams(model=model_id, max_output_tokens=WARMUP_TOKENS, temperature=0.0,
                                      input=[InputMessage(role="user", content=InputMessageContent(WARMUP_PROMPT))])
    mx_barrier(group)
    tic = time.monotonic()
    n = sum(1 for _ in medusa_generate(medusa, tokenizer, params, apply_chat_template(tokenizer, params)))
    every = min(math.ceil(n / max(time.monotonic() - tic, 1e-3)), MAX_CANCEL_EVERY)
    if comm is not None:  # the same on every rank: the checks are collective
        every = int(max(comm.all_gather(mx.array([every]), "agreeing on the cancel interval").tolist()))
    return every


class MedusaParts:
    """What both Medusa engines add to exo's: the heads' model, the ranks' link, the warm-up.

    ``model`` stays exo's model (exo's parsers pick a format by its class); ``medusa`` is
    the same model with the heads beside it.
    """

    def comm(self) -> Comm | None:
        """The link between the ranks (checks that they emitted the same tokens); None alone."""
        if self.medusa is None:
            raise ValueError("a Medusa engine needs medusa: exo's model with the heads beside it")
        if self.group is None or self.group.size() <= 1:
            return None
        return Comm(self.group, Watchdog(self.group.rank()))

    def serve_prefill(self, request, wfile: BinaryIO) -> None:
        raise ValueError("the Medusa engine does not serve disaggregated prefill (its tree cache is not exo's KV "
                         "format): leave exo's disaggregation off for models with Medusa heads")


@dataclass(eq=False)
class MedusaEngine(MedusaParts, SequentialGenerator):
    """exo's ``SequentialGenerator`` (one task at a time, as ``EXO_NO_BATCH``) decoding with Medusa."""

    medusa: MedusaModel | None = None
    _comm: Comm | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._comm = self.comm()

    def warmup(self) -> None:
        self.check_for_cancel_every = warm_up(self.medusa, self.tokenizer, self.model_id, self.group, self._comm)

    def _build_generator(self, task) -> Iterator[GenerationResponse]:
        """exo's ``_build_generator`` with ``medusa_generate`` in ``mlx_generate``'s place."""
        _check_for_debug_prompts(task.task_params)
        prompt = apply_chat_template(self.tokenizer, task.task_params)
        events = self.event_sender
        model_id, rank = self.model_id, self.device_rank

        def on_prefill_progress(processed: int, total: int) -> None:
            if rank == 0:
                events.send(ChunkGenerated(command_id=task.command_id, chunk=PrefillProgressChunk(
                    model=model_id, processed_tokens=processed, total_tokens=total)))

        def distributed_prompt_progress_callback() -> None:
            self.agree_on_cancellations()
            if self.should_cancel(task.task_id):
                raise PrefillCancelled()
            self.agree_on_tasks()

        since_check = self.check_for_cancel_every

        def on_generation_token() -> None:
            nonlocal since_check
            since_check += 1
            if since_check >= self.check_for_cancel_every:  # at the same token on every rank
                since_check = 0
                distributed_prompt_progress_callback()

        responses = medusa_generate(self.medusa, self.tokenizer, task.task_params, prompt,
                                    on_prefill_progress=on_prefill_progress,
                                    distributed_prompt_progress_callback=distributed_prompt_progress_callback,
                                    on_generation_token=on_generation_token)
        return self._agreed(responses)

    def _agreed(self, responses: Iterator[GenerationResponse]) -> Iterator[GenerationResponse]:
        """The responses; at the end the ranks check they emitted the same tokens."""
        tokens = []
        for r in responses:
            tokens.append(r.token)
            yield r
            if r.finish_reason is not None and self._comm is not None:
                check_agreement(self._comm, tokens)

