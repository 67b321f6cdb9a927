"""One model, one worker thread, every running request decoded in one batch; a bounded queue for overload.

All array work (loading, prefill, decoding) runs on one thread, since MLX keeps
per-thread streams (``engine.worker.WorkerThread`` frees them when the thread ends).
The event loop submits ``Job``s and reads their text deltas from an asyncio queue; the
worker inserts them into a ``BatchGenerator`` (up to ``decode_concurrency`` decode at
once, the rest wait their turn inside it) and runs its steps while any job is left,
handing each job the text its tokens add. A job whose client went away leaves the
batch at the next step, freeing its row; one whose time is up ends with "length".
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from ..cli_args import NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT
from ..core.accept import make_policy
from ..core.batch_generation import DEFAULT_COMPLETION_BATCH, BatchGenerator
from ..core.budget import BatchBudget
from ..core.generation import GenerationResponse
from ..engine.worker import WorkerThread
from .schema import APIError

log = logging.getLogger(__name__)
IDLE_WAIT_S = 1.0  # an idle worker looks for new jobs at least this often (it is woken at once anyway)


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
    response: GenerationResponse | None = None  # the last token's: counts and Medusa figures
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

    def cancel(self, error: APIError | None = None) -> None:
        """From the event loop: the job leaves the batch at its next step; ``stream`` ends now (raising ``error``)."""
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


@dataclass(eq=False)
class _Running:
    """A job inside the batch generator, and its clock."""

    job: Job
    uid: int
    deadline: float
    start: float  # when it entered the generator
    first: float | None = None  # when its first token came
    tokens: int = 0


class Scheduler:
    """Loads the model on its worker thread, then decodes the jobs submitted, in one batch.

    Args:
        load: returns (model, tokenizer); run on the worker thread.
        queue_size: jobs that may wait beyond the ``decode_concurrency`` decoding; more are answered 503.
        time_limit: seconds per job from when it enters the batch; then it ends with finish_reason "length".
        on_exit: run on the worker thread before it ends (MLX: ``mx.clear_streams``).
        decode_concurrency: jobs decoding at once (1: one at a time, in submission order).
        budget: the loaded model -> its ``BatchBudget`` (each job's tree as the batch fills);
            None: the budget's default rule.
        gen_kwargs: ``BatchGenerator``'s (``medusa``, ``max_kv_size``).
    """

    def __init__(self, load: Callable, queue_size: int = 32, time_limit: float = 300.0,
                 on_exit: Callable[[], None] | None = None, decode_concurrency: int = DEFAULT_COMPLETION_BATCH,
                 budget: Callable[[object], BatchBudget] | None = None, **gen_kwargs):
        NON_NEGATIVE_INT.check("--queue-size", queue_size)  # the rules of the server's flags
        POSITIVE.check("--request-timeout", time_limit)
        POSITIVE_INT.check("--decode-concurrency", decode_concurrency)
        self._worker = WorkerThread("mlx-medusa-server", on_exit)
        try:
            self.model, self.tokenizer = self._worker.submit(load).result()
            self.budget = budget(self.model) if budget is not None else BatchBudget()
        except BaseException:
            self._worker.shutdown()  # its thread cleans up before the error ends the process
            raise
        self.queue_size, self.time_limit, self.decode_concurrency = queue_size, time_limit, decode_concurrency
        self._gen_kwargs = gen_kwargs
        self._slots = threading.BoundedSemaphore(queue_size + decode_concurrency)
        self._jobs: set[Job] = set()  # submitted, not yet finished
        self.finished: deque[tuple[str, int]] = deque(maxlen=1024)  # (outcome, tokens) of recent jobs
        self._inbox: deque[Job] = deque()
        self._wake = threading.Event()
        self._closing = False
        self._gen: BatchGenerator | None = None
        self._running: dict[int, _Running] = {}
        self._loop = self._worker.submit(self._serve)

    @property
    def stats(self):
        """The batch's counters (``BatchStats``: steps, rows, tokens) since it last started afresh; None before."""
        return None if self._gen is None else self._gen.stats

    def submit(self, args: GenerationArgs) -> Job:
        """Queue a job (on the event loop), or answer 503 when the queue is full."""
        if not self._slots.acquire(blocking=False):
            raise APIError(503, f"the server is busy ({self.decode_concurrency} requests decoding, {self.queue_size} "
                                "waiting): retry later", code="queue_full", type="server_error",
                           headers={"Retry-After": "1"})
        job = Job(args, asyncio.get_running_loop())
        self._jobs.add(job)
        self._inbox.append(job)
        self._wake.set()
        return job

    def cancel_all(self) -> None:
        """On the event loop, when the server shuts down: every job ends at its next step with a 503."""
        error = APIError(503, "the server is shutting down", code="shutting_down", type="server_error")
        for job in list(self._jobs):
            job.cancel(error)

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        self._worker.shutdown(wait=True)

    # ------------------------------------------------------------ the worker thread

    def _serve(self) -> None:
        """The worker's loop: admit new jobs, drop cancelled ones, one batched step; until ``close``."""
        while not self._closing:
            self._wake.clear()  # before looking: a job submitted after the look sets it again
            try:
                self._admit()
                self._drop_cancelled()
                if not self._running:
                    self._wake.wait(IDLE_WAIT_S)
                    continue
                self._dispatch(self._gen.next())
            except Exception as e:  # every job in the batch gets a 500; the server keeps serving
                log.exception("generation failed")
                self._fail_all(e)
        self._drop_cancelled()
        error = APIError(503, "the server is shutting down", code="shutting_down", type="server_error")
        self._fail_all(error)
        while self._inbox:
            job = self._inbox.popleft()
            if not job.cancelled.is_set():
                job.put(error)
            self._finish(job, "cancelled" if job.cancelled.is_set() else "error", 0)

    def _generator(self) -> BatchGenerator:
        if self._gen is None:
            self._gen = BatchGenerator(self.model, self.tokenizer, completion_batch_size=self.decode_concurrency,
                                       **self._gen_kwargs)
            self._gen.tree_for = self.budget.tree_for
        return self._gen

    def _admit(self) -> None:
        while self._inbox:
            job = self._inbox.popleft()
            if job.cancelled.is_set():  # its client left while it waited
                self._finish(job, "cancelled", 0)
                continue
            a = job.args
            try:
                (uid,) = self._generator().insert([a.ids], [a.max_tokens], [make_policy(a.temp, a.top_p, seed=a.seed)],
                                                  [a.stops])
            except ValueError as e:  # a request the model cannot take: a 400 for it alone
                job.put(APIError(400, str(e)))
                self._finish(job, "error", 0)
                continue
            now = time.monotonic()
            self._running[uid] = _Running(job, uid, now + self.time_limit, now)

    def _drop_cancelled(self) -> None:
        gone = [r for r in self._running.values() if r.job.cancelled.is_set()]
        if gone:
            self._gen.remove([r.uid for r in gone])
            for r in gone:
                del self._running[r.uid]
                self._finish(r.job, "cancelled", r.tokens)

    def _dispatch(self, responses: list) -> None:
        """Each job's tokens of this step as one delta; a job past its time ends here."""
        by_uid: dict[int, list] = {}
        for resp in responses:
            by_uid.setdefault(resp.uid, []).append(resp)
        now, ended = time.monotonic(), []
        for uid, rs in by_uid.items():
            r = self._running[uid]
            last = rs[-1]
            r.first = r.first or now
            r.tokens = last.generation_tokens
            text, finish, timed_out = "".join(x.text for x in rs), last.finish_reason, False
            if finish is None and now > r.deadline:
                finish, timed_out = "length", True
                text += self._gen.remove([uid]).get(uid, "")
            r.job.put(Delta(text, finish, self._response(r, last, now), timed_out))
            if finish:
                ended.append(r)
                self._finish(r.job, "timeout" if timed_out else finish, r.tokens)
        for r in ended:
            del self._running[r.uid]

    def _response(self, r: _Running, last, now: float) -> GenerationResponse:
        n, prompt = last.generation_tokens, len(r.job.args.ids)
        return GenerationResponse(
            text=last.text, token=last.token, accepted=last.accepted, finish_reason=last.finish_reason,
            prompt_tokens=prompt, prompt_tps=prompt / max(r.first - r.start, 1e-9), generation_tokens=n,
            generation_tps=(n - 1) / max(now - r.first, 1e-9) if n > 1 else 0.0,
            peak_memory=self._gen.stats.peak_memory, steps=last.steps, mean_accepted=last.mean_accepted)

    def _fail_all(self, error: BaseException) -> None:
        """Every job in the batch ends with ``error``; the next job starts a fresh batch."""
        for r in self._running.values():
            r.job.put(error)
            self._finish(r.job, "error", r.tokens)
        self._running.clear()
        self._gen = None

    def _finish(self, job: Job, outcome: str, tokens: int) -> None:
        self._jobs.discard(job)
        self.finished.append((outcome, tokens))
        self._slots.release()
