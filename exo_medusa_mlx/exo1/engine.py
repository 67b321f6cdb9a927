"""exo 1.x's engine with Medusa: exo's own ``SequentialGenerator``, each task decoded by the Medusa step.

``MedusaEngine`` is exo's ``SequentialGenerator`` with the generator it builds per task
replaced: ``medusa_generate`` yields exo's ``GenerationResponse``s as exo's
``mlx_generate`` does (same tokenisation, sampling controls and defaults, stop strings,
usage, stats, log-probabilities, prefill progress), decoded with ``core.step.generate_step``
over a ``MedusaModel`` built on exo's own loaded (and sharded) model. Everything around it
is exo's: ranks agreeing on tasks and cancellations, exo's output parsers (tool calls,
thinking tags, reasoning-token counts), error chunks. Every rank runs the same step on the
all-gathered hidden state (SPMD) with the task's seed, so the ranks draw alike.

Batching plugs in beside it: exo's ``BatchGenerator`` drives an ``ExoBatchGenerator``
(``submit`` -> uid, ``step`` -> [(uid, GenerationResponse)], ``cancel``, ``has_work``,
``close``); a Medusa one runs the batched step over several ``Decode`` states, each
turning its row's ``Step``s into exo's responses with ``Decode.responses``.
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
class Decode:
    """One task's decoding state, whichever step produces its ``Step``s (sequential here; a row of
    the batched step later): exo's stop strings, log-probabilities, usage and stats."""

    tokenizer: object
    params: TextGenerationTaskParams
    prompt_tokens: int
    tree_size: int  # nodes each verification checks (1: no heads)
    acceptor: object  # the policy's acceptor: a ProcessedAcceptor carries the log-probabilities
    on_generation_token: Callable[[], None] | None = None

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
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=0),
                     completion_tokens_details=CompletionTokensDetails(
                         accepted_prediction_tokens=accepted, rejected_prediction_tokens=max(guessed - accepted, 0)))

    def _stats(self, r: Response) -> GenerationStats:
        return GenerationStats(prompt_tps=float(r.prompt_tps), generation_tps=float(r.generation_tps),
                               prompt_tokens=self.prompt_tokens, generation_tokens=r.generation_tokens,
                               peak_memory_usage=Memory.from_gb(r.peak_memory))


def _error(message: str) -> GenerationResponse:
    """A request refused before any work: exo's parsers turn it into an ``ErrorChunk``."""
    return GenerationResponse(text=message, token=0, finish_reason="error", usage=None)


def medusa_generate(model: MedusaModel, tokenizer, task: TextGenerationTaskParams, prompt: str, *,
                    on_prefill_progress: Callable[[int, int], None] | None = None,
                    distributed_prompt_progress_callback: Callable[[], None] | None = None,
                    on_generation_token: Callable[[], None] | None = None) -> Iterator[GenerationResponse]:
    """exo's ``mlx_generate`` for one task (its arguments less the prefix cache and vision), with Medusa."""
    ids = np.array(fix_unmatched_think_end_tokens(encode_prompt(tokenizer, prompt), tokenizer), dtype=np.int64)
    max_tokens = task.max_output_tokens or MAX_TOKENS
    if model.max_context:  # the tree cache holds the context; exo's own engine would run past it
        max_tokens = min(max_tokens, model.max_context - len(ids))
    try:
        if max_tokens < 1:
            raise LimitError(f"prompt has {len(ids)} tokens, the model's context is {model.max_context}: "
                             "shorten it")
        sampling = exo_sampling(task, eos_ids_from_tokenizer(tokenizer) if task.bench else ())
        # exo's decode loop starts from the prompt's last two tokens, so its penalties see those, then the output.
        policy = make_sampling_policy(sampling, ids[-2:].tolist(), task.seed or DEFAULT_SEED, task.logprobs)
    except ValueError as e:
        yield _error(str(e))
        return
    chunks = [0]

    def check() -> None:  # before each prefill chunk, on every rank alike
        if distributed_prompt_progress_callback is not None:
            distributed_prompt_progress_callback()
        if on_prefill_progress is not None:
            on_prefill_progress(min(chunks[0] * PREFILL_STEP, len(ids)), len(ids))
        chunks[0] += 1

    def steps() -> Iterator[Step]:
        for step in generate_step(ids, model, policy, max_tokens=max_tokens, check=check):
            if step.tree_size == 0 and on_prefill_progress is not None:
                on_prefill_progress(len(ids), len(ids))
            yield step

    model.reset_peak_memory()
    decode = Decode(tokenizer, task, len(ids), model.tree.size if model.heads is not None else 1, policy.accept,
                    on_generation_token)
    ours = stream_steps(steps(), len(ids), eos_ids(tokenizer, model.eos_token_ids), model.detokenizer(tokenizer),
                        max_tokens, model.peak_memory_gb, time.perf_counter())
    yield from decode.responses(ours)


@dataclass(eq=False)
class MedusaEngine(SequentialGenerator):
    """exo's ``SequentialGenerator`` (one task at a time, as ``EXO_NO_BATCH``) decoding with Medusa.

    ``model`` stays exo's model (exo's parsers pick a format by its class); ``medusa``
    is the same model with the heads beside it.
    """

    medusa: MedusaModel | None = None
    _comm: Comm | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.medusa is None:
            raise ValueError("MedusaEngine needs medusa: exo's model with the heads beside it")
        if self.group is not None and self.group.size() > 1:
            self._comm = Comm(self.group, Watchdog(self.group.rank()))

    def warmup(self) -> None:
        """Decode exo's warm-up prompt with Medusa; check for cancellation about once a second, as exo."""
        params = TextGenerationTaskParams(model=self.model_id, max_output_tokens=WARMUP_TOKENS, temperature=0.0,
                                          input=[InputMessage(role="user", content=InputMessageContent(WARMUP_PROMPT))])
        mx_barrier(self.group)
        tic = time.monotonic()
        n = sum(1 for _ in medusa_generate(self.medusa, self.tokenizer, params,
                                           apply_chat_template(self.tokenizer, params)))
        every = min(math.ceil(n / max(time.monotonic() - tic, 1e-3)), MAX_CANCEL_EVERY)
        if self._comm is not None:  # the same on every rank: the checks are collective
            every = int(max(self._comm.all_gather(mx.array([every]), "agreeing on the cancel interval").tolist()))
        self.check_for_cancel_every = every

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

    def serve_prefill(self, request, wfile: BinaryIO) -> None:
        raise ValueError("the Medusa engine does not serve disaggregated prefill (its tree cache is not exo's KV "
                         "format): leave exo's disaggregation off for models with Medusa heads")
