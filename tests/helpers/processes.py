"""Commands and processes: a command's ``main`` run in this process or ``python -m exo_medusa_mlx``
as a process, its one error line checked, a script under scripts/ imported, a ring node process
read as the launcher reads it, a process waited out."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers.events import wait_until

ROOT = Path(__file__).resolve().parents[2]  # the checkout
NOISE = ("Traceback", "Fatal Python error", "Aborted", "Segmentation fault", "terminate called")


def clean(text: str) -> None:
    """No traceback, no interpreter abort, no crash in a command's output."""
    for word in NOISE:
        assert word not in text, text[-3000:]


def error_line(code, err: str) -> tuple[int, str]:
    """(exit code, the one error line) of a command that exited: ``sys.exit("error: ...")`` gives a
    string code (printed, exit 1); argparse prints its usage and one ``error:`` line (exit 2)."""
    clean(err)
    if isinstance(code, str):
        assert "\n" not in code, code
        return 1, code
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines, f"exit {code} with nothing on stderr"
    return code, lines[-1]


def run_main(main, argv: list[str], capsys, stdin: bytes | None = None, monkeypatch=None) -> tuple[int, str]:
    """A command's ``main(argv)`` in this process, expected to exit: (exit code, error line)."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    with pytest.raises(SystemExit) as e:
        main(argv)
    captured = capsys.readouterr()
    return error_line(e.value.code, captured.err)


def run_cli(args: list[str], timeout: float = 120, stdin: bytes | None = None, env: dict | None = None):
    """``python -m exo_medusa_mlx ARGS`` as a process: (returncode, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "exo_medusa_mlx", *args], cwd=ROOT, input=stdin, capture_output=True,
                       timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


class NodeProcess:
    """``python -m exo_medusa_mlx.ring.node --watch-stdin ...`` with stdin held as the launcher holds it."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "exo_medusa_mlx.ring.node", "--watch-stdin", *args],
                                         cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=f,
                                         env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
                                         start_new_session=True)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self._lines.put(ln) for ln in self.proc.stdout] + [self._lines.put(None)],
                         daemon=True).start()
        self.ready: dict = {}

    def wait_ready(self, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while not self.ready:
            line = self._lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                pytest.fail(f"the node exited with {self.proc.wait()}: {self.log.read_text()[-2000:]}")
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if msg.get("event") == "ready":
                self.ready = msg
        return self.ready

    @property
    def address(self) -> str:
        return self.wait_ready()["address"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdin:
            self.proc.stdin.close()


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module, so a test calls its ``main`` in-process."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def gone(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` ends within ``timeout`` seconds."""
    return wait_until(lambda: not alive(pid), timeout)
