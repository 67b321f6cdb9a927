"""This machine, as the tools record it: its CPU, cores, the cache folder everything tuned or built goes to,
and free ports for the processes a launcher starts on it."""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path


def cache_root() -> Path:
    """``$EXO_MEDUSA_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/exo_medusa_mlx``."""
    env = os.environ.get("EXO_MEDUSA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "exo_medusa_mlx"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` says."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def this_machine(device) -> dict:
    """What a tuned tree depends on: the CPU, its cores and the device the model runs on."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "device": str(device)}


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` ports free on ``host`` now (bound together, then released), so that every process can
    be told all the addresses before it starts."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host.strip("[]"), 0))
        return [s.getsockname()[1] for s in socks]
    except OSError as e:
        raise ValueError(f"--host {host}: cannot bind it ({e.strerror})") from None
    finally:
        for s in socks:
            s.close()
