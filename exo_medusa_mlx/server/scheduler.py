"""One model, one worker thread, a bounded first-in first-out queue of generation jobs.

All array work (loading, prefill, decoding) runs on one thread, since MLX keeps
per-thread streams (``exo.worker.WorkerThread`` frees them when the thread ends).
The event loop submits ``Job``s and reads their text deltas from an asyncio queue; a
job whose client went away, or whose time is up, stops at its next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from ..cli_args import NON_NEGATIVE_INT, POSITIVE
from ..core.limits import Cancelled
from ..engine.worker import WorkerThread
from .schema import APIError
from ..core.stops import StopMatcher

log = logging.getLogger(__name__)


@dataclass
class GenerationArgs:
    ids: list[int]  # the prompt, tokenised
    max_tokens: int
    temp: float
    top_p: float
    seed: int | None
    stops: list[str]


@dataclass
class Delta:
    text: str
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length" (max_tokens or time), None
    response: object | None = None  # the last token's GenerationResponse: counts and Medusa figures
    timed_out: bool = False


class Job:
    """One request's generation: the worker puts deltas, the event loop reads them."""

    def __init__(self, args: GenerationArgs, loop: asyncio.AbstractEventLoop):
        self.args = args
        self.cancelled = threading.Event()
        self._loop = loop
        self._deltas: asyncio.Queue = asyncio.Queue()

    def put(self, item: Delta | BaseException) -> None:
        """From the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._deltas.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody reads any more
            self.cancelled.set()

    def check(self) -> None:
        """From the worker, between prefill chunks: stop a long prompt whose client left."""
        if self.cancelled.is_set():
            raise Cancelled("the request was cancelled")

    def cancel(self, error: APIError | None = None) -> None:
        """From the event loop: the worker stops at its next step; ``stream`` ends now (raising ``error``)."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            self._deltas.put_nowait(error)

    async def stream(self) -> AsyncIterator[Delta]:
        """Deltas as they come (those that arrived together as one); ends after the finishing one."""
        while True:
            items = [await self._deltas.get()]
            while not self._deltas.empty():
                items.append(self._deltas.get_nowait())
            run: list[Delta] = []
            for item in items + [None]:
                if isinstance(item, Delta):
                    run.append(item)
                    continue
                if run:
                    last = run[-1]
                    yield Delta("".join(d.text for d in run), last.finish_reason, last.response, last.timed_out)
                    if last.finish_reason:
                        return
                    run = []
                if isinstance(item, BaseException):
                    raise item
            if self.cancelled.is_set():
                return


class Scheduler:
    """Loads the model on its worker thread, then runs one job at a time in submission order.

    Args:
        load: returns (model, tokenizer); run on the worker thread.
        stream_generate: the backend's ``stream_generate``.
        queue_size: jobs that may wait behind the running one; more are answered 503.
        time_limit: seconds of generation per job; then it ends with finish_reason "length".
        on_exit: run on the worker thread before it ends (MLX: ``mx.clear_streams``).
        gen_kwargs: passed to every ``stream_generate`` call (``medusa``, ``max_kv_size``).
    """

    def __init__(self, load: Callable, stream_generate: Callable, queue_size: int = 32, time_limit: float = 300.0,
                 on_exit: Callable[[], None] | None = None, **gen_kwargs):
        NON_NEGATIVE_INT.check("--queue-size", queue_size)  # the rules of the server's flags
        POSITIVE.check("--request-timeout", time_limit)
        self._worker = WorkerThread("mlx-medusa-server", on_exit)
        try:
            self.model, self.tokenizer = self._worker.submit(load).result()
        except BaseException:
            self._worker.shutdown()  # its thread cleans up before the error ends the process
            raise
        self.queue_size, self.time_limit = queue_size, time_limit
        self._stream_generate, self._gen_kwargs = stream_generate, gen_kwargs
        self._slots = threading.BoundedSemaphore(queue_size + 1)
        self._jobs: set[Job] = set()  # queued or running
        self.finished: deque[tuple[str, int]] = deque(maxlen=1024)  # (outcome, tokens) of recent jobs

    def submit(self, args: GenerationArgs) -> Job:
        """Queue a job (on the event loop), or answer 503 when the queue is full."""
        if not self._slots.acquire(blocking=False):
            raise APIError(503, f"the server is busy ({self.queue_size} requests waiting): retry later",
                           code="queue_full", type="server_error", headers={"Retry-After": "1"})
        job = Job(args, asyncio.get_running_loop())
        self._jobs.add(job)
        self._worker.submit(self._run, job)
        return job

    def cancel_all(self) -> None:
        """On the event loop, when the server shuts down: every job ends at its next step with a 503."""
        error = APIError(503, "the server is shutting down", code="shutting_down", type="server_error")
        for job in list(self._jobs):
            job.cancel(error)

    def close(self) -> None:
        self._worker.shutdown(wait=True)

    def _run(self, job: Job) -> None:
        outcome, tokens = "error", 0
        try:
            outcome, tokens = self._generate(job)
        except Cancelled:  # its client left (or the server stops) during the prefill
            outcome = "cancelled"
        except Exception as e:  # the request gets a 500; the server keeps serving
            log.exception("generation failed")
            job.put(e)
        finally:
            self._jobs.discard(job)
            self.finished.append((outcome, tokens))
            self._slots.release()

    def _generate(self, job: Job) -> tuple[str, int]:
        if job.cancelled.is_set():  # its client left while it waited
            return "cancelled", 0
        a = job.args
        stops = StopMatcher(a.stops)
        deadline = time.monotonic() + self.time_limit
        gen = self._stream_generate(self.model, self.tokenizer, a.ids, max_tokens=a.max_tokens, temp=a.temp,
                                    top_p=a.top_p, seed=a.seed, check=job.check, **self._gen_kwargs)
        try:
            for r in gen:
                text, hit = stops.feed(r.text)
                finish = "stop" if hit else r.finish_reason
                timed_out = finish is None and time.monotonic() > deadline
                if timed_out:
                    finish = "length"
                if finish and not hit:
                    text += stops.flush()
                if text or finish:
                    job.put(Delta(text, finish, r, timed_out))
                if finish:
                    return ("timeout" if timed_out else finish), r.generation_tokens
                if job.cancelled.is_set():
                    return "cancelled", r.generation_tokens
        finally:
            gen.close()  # frees the cache now, not at the next collection
        raise RuntimeError("stream_generate ended without a finish reason")
