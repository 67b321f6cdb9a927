"""``LocalRing``: N local node processes holding one model's layers (``mlx_medusa ring`` runs one).

It owns the node processes: each runs ``mlx_medusa node`` in its own
process group, reports ``{"event": "ready", "address": ...}`` on stdout once its
shard is loaded, and exits when its stdin (a pipe only the launcher holds)
closes, so even a killed launcher leaves no node behind. ``close`` (also run at
exit and on SIGTERM / Ctrl-C) terminates every group, then kills what is left.
The launcher picks the nodes' ports first and gives each node the ring's addresses
(``--peers``): a node forwards to no other; with a token, every call carries it.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

from ..cli_args import one_line
from ..core.machine import free_ports
from ..engine.shard import Shard, partition_layers
from .auth import TOKEN_ENV
from .client import DEFAULT_TIMEOUT_S, NodeInfo, RingClient, RingError
from .node import BACKENDS, format_address

# Nodes on one host take turns: their idle threads must sleep, not spin (OpenBLAS spins 2^28
# cycles by default, OpenMP a while too), or they take the cores from the node at work.
SHARE_CORES = {"OPENBLAS_THREAD_TIMEOUT": "4", "OMP_WAIT_POLICY": "PASSIVE"}
START_TIMEOUT_S = 300.0  # loading a shard on a busy CPU
STOP_GRACE_S = 5.0
TAIL_LINES = 3  # of a node's log, quoted when it fails to start


class _Node:
    """One node process and its log."""

    def __init__(self, backend: str, shard: Shard, log: Path):
        self.backend, self.shard, self.log = backend, shard, log
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None
        self.ready: dict = {}  # the node's ready line (address, pid, heads, tree)
        self._lines: queue.Queue = queue.Queue()

    def start(self, argv: list[str], env: dict) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
                                         start_new_session=True)
        self._lines = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self._lines), daemon=True).start()

    @staticmethod
    def _read(proc: subprocess.Popen, lines: queue.Queue) -> None:
        with proc.stdout:
            for line in proc.stdout:  # drained to the end, so the node never blocks on a full pipe
                lines.put(line)
        lines.put(None)

    def wait_ready(self, deadline: float, keep_log: bool = True) -> str:
        """The node's address once it is ready; else a one-line ``RingError`` quoting its log's last
        lines (and naming the log when ``keep_log``: a temporary one is gone by the time it is read)."""
        where = f" (log: {self.log})" if keep_log else ""
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RingError(f"{self.describe()} did not get ready in time{where}: {self.tail()}") from None
            if line is None:
                self.proc.wait()
                raise RingError(f"{self.describe()} exited with code {self.proc.returncode} while starting{where}: "
                                f"{self.tail()}")
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(msg, dict) and msg.get("event") == "ready":
                self.ready = msg
                self.address = msg["address"]
                return self.address

    def describe(self) -> str:
        where = self.address or "(starting)"
        return f"node {where} ({self.backend}, layers {self.shard.start_layer}-{self.shard.end_layer})"

    def tail(self, n: int = TAIL_LINES) -> str:
        """The log's last ``n`` non-empty lines, on one line."""
        try:
            lines = [ln.strip() for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "(no log)"
        return one_line(" | ".join(lines[-n:])) if lines else "(its log is empty)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass


class LocalRing:
    """N node processes on this machine holding one model's layers, first to last.

    Args:
        backends: one per node ("mlx" or "torch"), in layer order.
        model: model id or local Hugging Face folder (default: the embedded default model).
        heads, tree: Medusa heads folder and tree for the last node.
        weights: relative share of layers per node (e.g. each node's memory); default even.
        threads: CPU threads per node (BLAS, OpenMP and torch). None: the nodes share the host's
            cores in turn (a pass visits one node at a time), each may use them all, and idle BLAS
            and OpenMP threads sleep at once instead of spinning (``SHARE_CORES``): spinning
            threads of the waiting nodes took the cores from the working one (a 2-node ring ran
            at 0.38x of one node).
        port: first port (node i gets port + i); 0: any free ports.
    """

    def __init__(self, backends: Sequence[str], model: str | None = None, *, heads: str | Path | None = None,
                 tree: str | None = None, weights: Sequence[float] | None = None, host: str = "127.0.0.1",
                 port: int = 0, threads: int | None = None, max_kv_size: int | None = None,
                 start_timeout: float = START_TIMEOUT_S, log_dir: str | Path | None = None,
                 token: str | None = None):
        from ..default_model import DEFAULT_MODEL_ID
        from .node import model_layers

        bad = [b for b in backends if b not in BACKENDS]
        if bad or not backends:
            raise ValueError(f"backends {list(backends)}: give one of {', '.join(BACKENDS)} per node")
        self.model = model or DEFAULT_MODEL_ID
        self.n_layers = model_layers(self.model)
        ranges = partition_layers(self.n_layers, weights or [1.0] * len(backends))
        if len(ranges) != len(backends):
            raise ValueError(f"{len(weights)} partition weights for {len(backends)} nodes")
        self.host, self.port, self.threads = host, port, threads
        self.heads, self.tree, self.max_kv_size = heads, tree, max_kv_size
        self.start_timeout, self.token = start_timeout, token
        self._ports: list[int] = []
        self._own_logs = log_dir is None  # a temporary folder, removed on close (errors quote the log's tail)
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="medusa-ring-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._nodes = [_Node(b, Shard(self.model, a, e, self.n_layers), self.log_dir / f"node{i}.log")
                       for i, (b, (a, e)) in enumerate(zip(backends, ranges))]
        self._closed = False

    @property
    def nodes(self) -> list[NodeInfo]:
        return [NodeInfo(n.address, n.shard, n.backend) for n in self._nodes]

    def client(self, timeout: float = DEFAULT_TIMEOUT_S) -> RingClient:
        return RingClient(self.nodes, timeout, token=self.token)

    def _argv(self, i: int, port: int) -> list[str]:
        n = self._nodes[i]
        peers = ",".join(format_address(self.host, p) for j, p in enumerate(self._ports) if j != i)
        argv = [sys.executable, "-m", "exo_medusa_mlx.ring.node", "--watch-stdin", "--backend", n.backend,
                "--host", self.host, "--port", str(port), "--model", self.model,
                "--start-layer", str(n.shard.start_layer), "--end-layer", str(n.shard.end_layer),
                "--peers", peers]
        for flag, value in (("--heads", self.heads), ("--tree", self.tree), ("--threads", self.threads),
                            ("--max-kv-size", self.max_kv_size)):
            if value is not None:
                argv += [flag, str(value)]
        return argv

    def _env(self) -> dict:
        env = dict(os.environ)
        env.pop(TOKEN_ENV, None)
        if self.token:
            env[TOKEN_ENV] = self.token  # not on the command line, where any user could read it
        if self.threads is not None:
            for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                env[k] = str(self.threads)
        for k, v in SHARE_CORES.items():
            env.setdefault(k, v)
        return env

    def start(self, wait: bool = True) -> "LocalRing":
        """Start every node process; with ``wait``, until all are ready (else call ``wait_ready``)."""
        atexit.register(self.close)
        try:
            n = len(self._nodes)
            self._ports = [self.port + i for i in range(n)] if self.port else free_ports(n, self.host)
            for i, node in enumerate(self._nodes):
                node.start(self._argv(i, self._ports[i]), self._env())
        except BaseException:
            self.close()
            raise
        self._deadline = time.monotonic() + self.start_timeout
        return self.wait_ready() if wait else self

    def wait_ready(self) -> "LocalRing":
        """Wait until every node has loaded its shard and serves; on failure stop them all."""
        try:
            for n in self._nodes:
                n.wait_ready(self._deadline, keep_log=not self._own_logs)
        except BaseException:
            self.close()
            raise
        return self

    def restart(self, i: int) -> NodeInfo:
        """Stop node ``i`` if it runs and start it again on the same address (it rejoins the ring)."""
        if self._closed:
            raise RuntimeError("this ring is closed; start a new LocalRing")
        n = self._nodes[i]
        self._stop([n])
        port = self._ports[i]  # its old address: the others know it as a peer
        n.start(self._argv(i, port), self._env())
        n.wait_ready(time.monotonic() + self.start_timeout, keep_log=not self._own_logs)
        return self.nodes[i]

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` (a crash, for tests)."""
        n = self._nodes[i]
        n.signal(signal.SIGKILL)
        n.proc.wait(timeout=STOP_GRACE_S)

    def medusa(self) -> str:
        """What the last node verifies with, in words."""
        ready = self._nodes[-1].ready
        if not ready.get("heads"):
            return "no Medusa heads found: plain decoding, one token per pass (give --heads)"
        return f"Medusa heads {ready['heads']}, tree {ready['tree']}"

    def pids(self) -> list[int | None]:
        return [n.proc.pid if n.alive() else None for n in self._nodes]

    @staticmethod
    def _stop(nodes: list[_Node]) -> None:
        for n in nodes:
            n.signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for n in nodes:
            if n.proc is None:
                continue
            try:
                n.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                n.signal(signal.SIGKILL)
                n.proc.wait()
            if n.proc.stdin is not None:
                n.proc.stdin.close()

    def close(self) -> None:
        """Stop every node: SIGTERM to each process group, SIGKILL after a grace period."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._stop(self._nodes)
        if self._own_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> "LocalRing":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
