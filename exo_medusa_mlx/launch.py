"""``mlx_medusa launch -n N -- generate --parallel pipeline ...``: N ranks on this machine.

Each rank runs ``python -m exo_medusa_mlx <command>`` with ``MLX_RANK`` and a ring
hostfile of 127.0.0.1 ports (``MLX_HOSTFILE``), as ``mlx.launch`` sets them, and one
BLAS thread unless told otherwise (the ranks share the cores). Rank 0 prints; the
launcher exits with the first failing rank's code after stopping the others.
For several machines use ``mlx.launch --backend ring --hostfile hosts.json`` (``docs/distributed.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .cli_args import non_negative_int, positive_float, positive_int
from .core.machine import free_ports

STOP_GRACE_S = 5.0
TIMEOUT_EXIT = 124


def write_hostfile(path: Path, ports: list[int]) -> None:
    """The ring backend's hostfile: one list of "ip:port" per rank."""
    path.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))


def rank_env(rank: int, hostfile: Path, threads: int | None, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env.update(MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile), PYTHONUNBUFFERED="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    return env


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each rank's process group, then SIGKILL what is left after a grace period."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 0.0)):
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + wait
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
    for p in procs:
        p.wait()


def launch(argv: list[str], n: int, *, threads: int | None = 1, timeout_s: float | None = None,
           env: dict | None = None, stdout=None, stderr=None) -> int:
    """Run ``argv`` as ranks 0..n-1 on this machine; returns the group's exit code.

    The first rank to fail (or ``timeout_s`` passing) stops the others: the result is
    that rank's exit code (124 on timeout), 0 when every rank succeeded.
    """
    if n < 1:
        raise ValueError(f"-n {n}: give at least 1 rank")
    with tempfile.TemporaryDirectory(prefix="mlx_medusa_launch_") as tmp:
        hostfile = Path(tmp) / "hosts.json"
        write_hostfile(hostfile, free_ports(n))
        procs: list[subprocess.Popen] = []
        try:
            for r in range(n):
                procs.append(subprocess.Popen(argv, env=rank_env(r, hostfile, threads, env), stdout=stdout,
                                              stderr=stderr, start_new_session=True))
            return _supervise(procs, timeout_s)
        finally:
            _stop(procs)


def _supervise(procs: list[subprocess.Popen], timeout_s: float | None) -> int:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        codes = [p.poll() for p in procs]
        failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            rank, code = failed[0]
            how = f"signal {-code}" if code < 0 else f"code {code}"
            sys.stderr.write(f"error: mlx_medusa launch: rank {rank} exited with {how}; stopping the others\n")
            return code if code > 0 else 128 - code
        if all(c == 0 for c in codes):
            return 0
        if deadline is not None and time.monotonic() > deadline:
            sys.stderr.write(f"error: mlx_medusa launch: the ranks did not finish within {timeout_s:g} s\n")
            return TIMEOUT_EXIT
        time.sleep(0.05)


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx_medusa launch", allow_abbrev=False,
                                description="Run an mlx_medusa command as N ranks of MLX distributed on this machine.",
                                epilog="example: mlx_medusa launch -n 2 -- generate --parallel pipeline --prompt Hi")
    p.add_argument("-n", "--ranks", type=positive_int, default=2, help="number of ranks (processes)")
    p.add_argument("--threads", type=non_negative_int, default=1,
                   help="BLAS threads per rank (OMP/OPENBLAS_NUM_THREADS); 0 leaves the environment's")
    p.add_argument("--timeout", type=positive_float, default=None, help="stop every rank after this many seconds")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the mlx_medusa command, e.g. generate ...")
    return p


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        sys.exit("error: no command to launch: give one after --, e.g. -- generate --parallel pipeline")
    try:
        code = launch([sys.executable, "-m", "exo_medusa_mlx", *command], args.ranks, threads=args.threads or None,
                      timeout_s=args.timeout)
    except ValueError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
