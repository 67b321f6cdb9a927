"""``mlx_medusa ring``: start N local node processes, run a prompt through them, stream the answer.

``LocalRing`` owns the node processes: each runs ``mlx_medusa node`` in its own
process group, reports ``{"event": "ready", "address": ...}`` on stdout once its
shard is loaded, and exits when its stdin (a pipe only the launcher holds)
closes, so even a killed launcher leaves no node behind. ``close`` (also run at
exit and on SIGTERM / Ctrl-C) terminates every group, then kills what is left.
The launcher picks the nodes' ports first and gives each node the ring's addresses
(``--peers``): a node forwards to no other; with a token, every call carries it.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

from ..cli_args import fail, kv_window, non_negative_float, non_negative_int, one_line, port, positive_float
from ..cli_args import positive_int, probability, read_prompt
from ..exo.shard import Shard, partition_layers  # noqa: F401 (partition_layers: imported from here)
from .auth import TOKEN_ENV, env_token
from .client import DEFAULT_TIMEOUT_S, NodeInfo, RingClient, RingError
from .node import BACKENDS, format_address
from .proto import HOP_MARGIN_S

# Nodes on one host take turns: their idle threads must sleep, not spin (OpenBLAS spins 2^28
# cycles by default, OpenMP a while too), or they take the cores from the node at work.
SHARE_CORES = {"OPENBLAS_THREAD_TIMEOUT": "4", "OMP_WAIT_POLICY": "PASSIVE"}
START_TIMEOUT_S = 300.0  # loading a shard on a busy CPU
STOP_GRACE_S = 5.0
TAIL_LINES = 3  # of a node's log, quoted when it fails to start


def free_ports(host: str, n: int) -> list[int]:
    """``n`` ports free on ``host`` now (bound together, then released), so that every node can
    be told the ring's addresses before it starts."""
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
            self._ports = [self.port + i for i in range(n)] if self.port else free_ports(self.host, n)
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


# --------------------------------------------------------------------------- the command


def setup_arg_parser() -> argparse.ArgumentParser:
    from ..default_model import DEFAULT_MODEL_ID

    p = argparse.ArgumentParser(prog="mlx_medusa ring", allow_abbrev=False,
                                description="Start a local ring of node processes and generate through it.")
    p.add_argument("--nodes", type=positive_int, default=2, help="number of node processes")
    p.add_argument("--backends", default="mlx", help="comma-separated backend per node (one name: all nodes)")
    p.add_argument("--model", default=DEFAULT_MODEL_ID, help="model id or local Hugging Face folder")
    p.add_argument("--heads", default=None, help="Medusa heads folder (default: the model's shipped heads)")
    p.add_argument("--tree", default=None, help="tree preset, JSON file or choices")
    p.add_argument("--prompt", "-p", default="Hello", help="message to the model ('-' reads stdin)")
    p.add_argument("--ignore-chat-template", action="store_true", help="use the raw prompt without the chat template")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--max-tokens", type=positive_int, default=128)
    p.add_argument("--no-medusa", action="store_true", help="one token per ring pass")
    p.add_argument("--temp", type=non_negative_float, default=0.0)
    p.add_argument("--top-p", type=probability, default=1.0)
    p.add_argument("--seed", type=non_negative_int, default=None)
    p.add_argument("--max-kv-size", type=kv_window, default=None, help="committed KV window per request (rotating)")
    p.add_argument("--memory-gb", default=None,
                   help="comma-separated memory per node: layers split in proportion (default: evenly)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port, default=0, help="first node's port, the others follow (0: any free)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads per node")
    p.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT_S, help="seconds one pass may take")
    p.add_argument("--token", default=None,
                   help=f"shared secret the nodes require on every call (default: ${TOKEN_ENV}, else none)")
    p.add_argument("--log-dir", default=None, help="keep the nodes' logs here (default: a temporary folder, removed)")
    p.add_argument("--json", action="store_true", help="print one JSON object last on stdout")
    return p


def _csv(text: str, n: int, what: str, cast=str) -> list:
    items = [cast(x.strip()) for x in text.split(",") if x.strip()]
    if len(items) == 1:
        items *= n
    if len(items) != n:
        raise ValueError(f"--{what}: {len(items)} values for {n} nodes; give one, or one per node")
    return items


def load_tokenizer(model: str):
    """The model folder's tokenizer with a streaming detokenizer and the config's EOS ids: mlx-lm's
    wrapper where MLX is installed, else the torch backend's (the same ids and text)."""
    from ..backends import resolve_backend
    from ..exo.downloader import LocalShardDownloader

    from ..core.model_files import read_config

    folder = LocalShardDownloader().model_path(model)
    if resolve_backend("auto") == "torch":
        from ..torch_compat.generate import load_tokenizer as torch_load_tokenizer

        return torch_load_tokenizer(folder)
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    return mlx_load_tokenizer(folder, eos_token_ids=read_config(folder).get("eos_token_id"))


def prepare(args) -> tuple[LocalRing, str]:
    """Every check that needs no node: flags, the prompt, the model folder; the ring, not started."""
    if not 0 <= args.port <= 65535 - max(args.nodes - 1, 0):
        raise ValueError(f"--port {args.port}: the {args.nodes} nodes' ports must fit in 0..65535")
    if args.timeout <= HOP_MARGIN_S * args.nodes:
        raise ValueError(f"--timeout {args.timeout} s leaves no time per hop: give more than "
                         f"{HOP_MARGIN_S * args.nodes:.1f} s for {args.nodes} nodes")
    text = read_prompt(args.prompt)
    backends = _csv(args.backends, args.nodes, "backends")
    try:
        weights = _csv(args.memory_gb, args.nodes, "memory-gb", positive_float) if args.memory_gb else None
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"--memory-gb: {e}") from None
    ring = LocalRing(backends, args.model, heads=args.heads, tree=args.tree, weights=weights, host=args.host,
                     port=args.port, threads=args.threads, max_kv_size=args.max_kv_size, log_dir=args.log_dir,
                     token=args.token or env_token())
    return ring, text


def room(model: str, prompt_tokens: int, max_tokens: int, max_kv_size: int | None) -> int:
    """``max_tokens``, cut to what the context leaves after the prompt when the cache keeps every token
    (the nodes refuse a pass past the context); a note says so."""
    from ..core.limits import Limits
    from ..core.model_files import config_context, read_config
    from ..exo.downloader import LocalShardDownloader

    context = config_context(read_config(LocalShardDownloader().model_path(model)))
    if context is None:
        return max_tokens
    Limits(context, max_kv_size).check_prompt(prompt_tokens)
    if max_kv_size is None and prompt_tokens + max_tokens > context:
        print(f"note: the model's context holds {context - prompt_tokens} tokens after the {prompt_tokens}-token "
              f"prompt: generating at most that many", file=sys.stderr)
        return context - prompt_tokens
    return max_tokens


def main(argv: list[str] | None = None) -> None:
    args = setup_arg_parser().parse_args(argv)
    try:
        ring, text = prepare(args)
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    # SIGTERM unwinds like Ctrl-C, so the finally below stops the nodes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    out = sys.stderr if args.json else sys.stdout
    try:
        t0 = time.perf_counter()
        ring.start()
        tokenizer = load_tokenizer(args.model)
        from ..core.generation import apply_template, encode_prompt

        # Token ids with the template applied; raw text is encoded by the first node (exo's SendPrompt).
        prompt = apply_template(tokenizer, text, args.system_prompt, not args.ignore_chat_template)
        n_prompt = len(encode_prompt(tokenizer, prompt))
        max_tokens = room(args.model, n_prompt, args.max_tokens, args.max_kv_size)
        print(f"ring of {len(ring.nodes)} nodes ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for node, pid in zip(ring.nodes, ring.pids()):
            print(f"  {node.backend:5s} {node} pid {pid}", file=sys.stderr)
        if not args.no_medusa:
            print(ring.medusa(), file=sys.stderr)
        detok = tokenizer.detokenizer
        detok.reset()

        eos = set(tokenizer.eos_token_ids)

        def stream(tokens: list[int]) -> None:
            for t in tokens:
                if t not in eos:  # EOS is not text
                    detok.add_token(t)
            print(detok.last_segment, end="", file=out, flush=True)

        with ring.client(args.timeout) as client:
            result = client.generate(prompt, max_tokens, not args.no_medusa,
                                     eos_token_ids=tokenizer.eos_token_ids, temp=args.temp, top_p=args.top_p,
                                     seed=args.seed, on_tokens=stream)
        detok.finalize()
        print(detok.last_segment, file=out, flush=True)
    except (RingError, ValueError, FileNotFoundError) as e:
        fail(e)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    finally:
        ring.close()
    print_stats(result, sys.stderr)
    if args.json:
        tokens = result.tokens[:-1] if result.finish_reason == "stop" else result.tokens  # EOS is not text
        print(json.dumps({**result.to_dict(), "tokens": tokens, "text": tokenizer.decode(tokens),
                          "generation_tokens": len(result.tokens), "medusa": not args.no_medusa}))


def print_stats(result, file) -> None:
    print("=" * 10, file=file)
    print(f"Prompt: {len(result.prompt_tokens)} tokens, {result.prompt_s:.3f} s (first pass)", file=file)
    print(f"Generation: {len(result.tokens)} tokens, {result.generation_tps:.2f} tokens-per-sec, "
          f"{result.passes} passes, mean accepted length {result.mean_accepted:.2f}", file=file)
    print(f"Transport: {1000 * result.transport_s / (result.passes + 1):.2f} ms per pass", file=file)
    for t in result.nodes:
        per = 1000 / max(1, t.passes)
        print(f"  node {t.address} {t.backend:5s} layers {t.start_layer}-{t.end_layer}: compute "
              f"{t.compute_s * per:.2f} ms/pass, wire decode {t.decode_s * per:.2f} / encode "
              f"{t.encode_s * per:.2f} ms/pass", file=file)


if __name__ == "__main__":
    main()
