"""Assert what code did, not how long it took: wait for a condition, record the files a block opens or
the network it reaches, read the CPU time a process has spent. A machine shared by many runs makes
wall-clock bounds flaky; these facts do not depend on its load. Timeouts here only end a broken run."""

from __future__ import annotations

import builtins
import io
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def wait_until(cond: Callable[[], bool], timeout: float, poll: float = 0.02) -> bool:
    """Poll ``cond()`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


@contextmanager
def opened_files(monkeypatch) -> Iterator[list[Path]]:
    """The files Python code opens inside the block (``open``, ``io.open``, ``Path.open``), as paths."""
    seen: list[Path] = []
    real = builtins.open

    def recording(file, *args, **kwargs):
        if isinstance(file, (str, Path)):
            seen.append(Path(file))
        return real(file, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", recording)
        m.setattr(io, "open", recording)
        yield seen


@contextmanager
def no_network(monkeypatch) -> Iterator[list[str]]:
    """Inside the block a name lookup or a connection fails at once (OSError); yields what was tried."""
    tried: list[str] = []

    def lookup(host, *args, **kwargs):
        tried.append(f"getaddrinfo {host}")
        raise OSError(f"no network in this test (looked up {host})")

    def connect(self, address):
        tried.append(f"connect {address}")
        raise OSError(f"no network in this test (connected to {address})")

    with monkeypatch.context() as m:
        m.setattr(socket, "getaddrinfo", lookup)
        m.setattr(socket.socket, "connect", connect)
        m.setattr(socket.socket, "connect_ex", connect)
        yield tried


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) process ``pid`` has used: the work it did, whatever the load."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system

