"""One worker thread for all of an engine's array work, cleaned up before it exits, and the
passes queued or running on it, each cancellable from any thread (``PassWorker``).

exo's engines run their MLX work on a ``ThreadPoolExecutor(max_workers=1)``. MLX
0.32 gives each thread its own streams and asks that a thread call
``mx.clear_streams()`` before it ends: left to thread-local destructors, the
cleanup races interpreter shutdown and sometimes aborts the process
("terminate called without an active exception"). A pool worker cannot run
code on exit, so this single-thread executor does, via ``on_exit``.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
from concurrent.futures import Executor, Future
from typing import Callable

from ..core.limits import CancelToken


class WorkerThread(Executor):
    """A one-thread executor whose thread runs ``on_exit`` last; shut down at exit too."""

    def __init__(self, name: str, on_exit: Callable[[], None] | None = None):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._on_exit = on_exit
        self._closed = False
        self._lock = threading.Lock()
        # A daemon, so a forgotten engine never blocks exit; ``shutdown`` (also run at
        # exit by the owner's finalizer) still lets it finish and clean up first.
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                future, fn, args, kwargs = item
                if not future.set_running_or_notify_cancel():
                    del item, future, fn, args, kwargs
                    continue
                try:
                    result = fn(*args, **kwargs)
                except BaseException as e:  # handed to the awaiting caller, as ThreadPoolExecutor does
                    future.set_exception(e)
                else:
                    future.set_result(result)
                    del result
                # Drop the task before waiting: it holds the engine (which may be collected) and arrays.
                del item, future, fn, args, kwargs
        finally:
            if self._on_exit is not None:
                self._on_exit()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule work: the engine's worker thread is shut down")
            self._queue.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False, timeout: float | None = None) -> bool:
        """Stop after the work queued so far; with ``wait``, join the thread for up to ``timeout``
        seconds (None: until it ends). Returns whether the thread has ended (or was not waited for)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
        if wait and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True


class PassWorker:
    """An engine's worker thread, and the passes on it: each gets a ``CancelToken``, cancelled when
    its caller stops awaiting it (a gRPC deadline, a cancelled task) or by ``cancel_all``."""

    def __init__(self, name: str, on_exit: Callable[[], None] | None = None):
        self._thread = WorkerThread(name, on_exit)
        self._passes: set[CancelToken] = set()  # queued or running

    async def run(self, fn, *args):
        """``fn(*args)`` on the worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, functools.partial(fn, *args))

    async def run_pass(self, fn, *args):
        """``fn(*args, check)`` on the worker; ``check()`` raises ``Cancelled`` once the pass is cancelled."""
        token = CancelToken()
        self._passes.add(token)
        try:
            return await self.run(fn, *args, token.check)
        except asyncio.CancelledError:
            token.cancel("the caller gave up on the pass (deadline or cancellation)")
            raise
        finally:
            self._passes.discard(token)

    def cancel_all(self, reason: str) -> None:
        """Every queued or running pass stops at its next check (any thread)."""
        for token in list(self._passes):
            token.cancel(reason)

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop after the work queued so far; False if the thread was still busy after ``timeout`` s."""
        return self._thread.shutdown(timeout=timeout)
