"""Medusa over MLX distributed (``mx.distributed``): a model split across ranks that looks like one.

``shard(model, comm, "pipeline")`` keeps a contiguous range of decoder layers on each
rank: the first of them receives the hidden state from the previous rank, the last
sends it on, and the last rank's output is all-gathered, so ``base.model(tokens,
cache=...)`` returns the same final hidden state on every rank. ``"tensor"`` uses
mlx-lm's own ``model.shard(group)``. Every rank then runs the one ``generate_step``
(SPMD): heads, acceptance and sampling see the same states and one agreed seed, so
ranks agree without more messages. Each rank's tree cache holds its own layers only.
Every wait on another rank goes through ``Comm``: evaluated at once, timed (the
communication time per step), and watched: a wait longer than its timeout ends the
process with a one-line error instead of hanging.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.layers.distributed import ShardedToAllLinear

from .cli_args import DIST_TIMEOUT_S, PARALLEL_MODES, POSITIVE
from .core.generation import stream_generate
from .core.dynamic import Calibration, DynamicTree
from .engine.shard import partition_layers

LOAD_TIMEOUT_S = 1800.0  # ranks finish loading their weights at different times
WATCHDOG_EXIT = 3


class Watchdog:
    """Ends the process with a one-line error when a wait on other ranks outlasts its timeout.

    A blocked collective cannot be interrupted from Python, so the watch thread
    exits the process; a rank whose peer closed its sockets fails at once anyway
    (the ring backend raises), this catches the peers that hang or vanish silently.
    """

    def __init__(self, rank: int, timeout_s: float = DIST_TIMEOUT_S):
        POSITIVE.check("--dist-timeout", timeout_s)
        self.rank, self.timeout_s = rank, timeout_s
        self._deadline: float | None = None
        self._what, self._limit = "", timeout_s
        threading.Thread(target=self._watch, name="medusa-watchdog", daemon=True).start()

    @contextmanager
    def waiting(self, what: str, timeout_s: float | None = None):
        self._what, self._limit = what, timeout_s or self.timeout_s
        self._deadline = time.monotonic() + self._limit
        try:
            yield
        finally:
            self._deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout_s / 20))
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                sys.stderr.write(f"error: rank {self.rank}: {self._what}: no answer within {self._limit:g} s "
                                 "(--dist-timeout); another rank died or hangs\n")
                sys.stderr.flush()
                os._exit(WATCHDOG_EXIT)


class Comm:
    """The group's transport: each op is evaluated at once, under the watchdog, and timed."""

    def __init__(self, group: mx.distributed.Group, watchdog: Watchdog):
        self.group, self.watchdog = group, watchdog
        self.rank, self.size = group.rank(), group.size()
        self.seconds = 0.0  # spent waiting in distributed ops (transfer, and other ranks' compute)
        self.calls = 0

    def wait(self, y: mx.array, what: str, timeout_s: float | None = None) -> mx.array:
        tic = time.perf_counter()
        with self.watchdog.waiting(what, timeout_s):
            mx.eval(y)
        self.seconds += time.perf_counter() - tic
        self.calls += 1
        return y

    def recv_like(self, x: mx.array, src: int) -> mx.array:
        mx.eval(x)  # this rank's own work is not communication time
        return self.wait(mx.distributed.recv_like(x, src, group=self.group), f"receiving from rank {src}")

    def send(self, x: mx.array, dst: int) -> mx.array:
        mx.eval(x)
        self.wait(mx.distributed.send(x, dst, group=self.group), f"sending to rank {dst}")
        return x

    def all_gather(self, x: mx.array, what: str = "all_gather") -> mx.array:
        mx.eval(x)
        return self.wait(mx.distributed.all_gather(x, group=self.group), what)

    def all_sum(self, x: mx.array, what: str = "all_sum", timeout_s: float | None = None) -> mx.array:
        mx.eval(x)
        return self.wait(mx.distributed.all_sum(x, group=self.group), what, timeout_s)

    def barrier(self, what: str = "barrier", timeout_s: float | None = None) -> None:
        self.all_sum(mx.array(1.0), what, timeout_s)


def init(timeout_s: float = DIST_TIMEOUT_S, backend: str = "ring") -> Comm:
    """Join the ranks started by ``mlx_medusa launch`` or ``mlx.launch`` (MLX_RANK, MLX_HOSTFILE)."""
    if backend == "ring" and not (os.environ.get("MLX_RANK") and os.environ.get("MLX_HOSTFILE")):
        raise ValueError("--parallel needs ranks started by 'mlx_medusa launch -n N -- generate ...' "
                         "or mlx.launch (MLX_RANK and MLX_HOSTFILE are not set)")
    watchdog = Watchdog(int(os.environ.get("MLX_RANK", "0")), timeout_s)
    try:
        with watchdog.waiting("connecting to the other ranks"):
            group = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as e:
        raise ValueError(f"mx.distributed.init(backend='{backend}') failed: {e}") from None
    watchdog.rank = group.rank()
    return Comm(group, watchdog)


class PipelineStage(nn.Module):
    """A decoder layer at an end of this rank's range: it receives before it runs (first)
    and sends on, then all-gathers the last rank's output (last). Other attributes
    (``self_attn``, ``use_sliding`` ...) are the wrapped layer's."""

    def __init__(self, layer: nn.Module, comm: Comm, first: bool, last: bool):
        super().__init__()
        self.layer = layer
        self.comm = comm
        self.recv_from = comm.rank - 1 if first and comm.rank > 0 else None
        self.send_to = comm.rank + 1 if last and comm.rank < comm.size - 1 else None
        self.gather = last

    def __getattr__(self, key: str):
        if key != "layer" and "layer" in self:
            return getattr(self["layer"], key)
        return super().__getattr__(key)

    def __call__(self, x: mx.array, *args, **kwargs) -> mx.array:
        if self.recv_from is not None:
            x = self.comm.recv_like(x, self.recv_from)  # the embedding only gave the shape
        y = self.layer(x, *args, **kwargs)
        if self.send_to is not None:
            self.comm.send(y, self.send_to)
        if self.gather:
            y = self.comm.all_gather(y, "gathering the last hidden state")[-y.shape[0]:]  # the last rank's
        return y


class CommShardedToAll(ShardedToAllLinear):
    """mlx-lm's sharded-to-all linear with its sum through ``Comm`` (timed and watched)."""

    comm: Comm

    def __call__(self, x: mx.array) -> mx.array:
        x = self.comm.all_sum(x @ self["weight"].T)
        return x + self["bias"] if "bias" in self else x


def pipeline(base: nn.Module, comm: Comm, weights: list[float] | None = None) -> tuple[int, int]:
    """Keep this rank's layers of ``base`` (rank 0 the first), wrapped. Returns (start, end), inclusive."""
    layers = list(base.model.layers)
    start, end = partition_layers(len(layers), weights or [1.0] * comm.size)[comm.rank]
    own = layers[start : end + 1]
    if len(own) == 1:
        own[0] = PipelineStage(own[0], comm, first=True, last=True)
    else:
        own[0] = PipelineStage(own[0], comm, first=True, last=False)
        own[-1] = PipelineStage(own[-1], comm, first=False, last=True)
    base.model.layers = own  # the others' weights are dropped (never read, when loaded lazily)
    return start, end


def tensor(base: nn.Module, comm: Comm) -> None:
    """mlx-lm's tensor sharding of ``base``; its sums go through ``comm``."""
    args, n = base.args, comm.size
    mtype = getattr(args, "model_type", "?")
    if not hasattr(base, "shard"):
        raise ValueError(f"model type '{mtype}' has no tensor sharding in mlx-lm; use --parallel pipeline")
    sizes = {"num_attention_heads": args.num_attention_heads,
             "num_key_value_heads": getattr(args, "num_key_value_heads", None) or args.num_attention_heads,
             "intermediate_size": args.intermediate_size}
    bad = {k: v for k, v in sizes.items() if v % n}
    if bad:
        raise ValueError(f"tensor parallel over {n} ranks needs {', '.join(f'{k} ({v})' for k, v in bad.items())} "
                         f"divisible by {n}; use another rank count or --parallel pipeline")
    base.shard(comm.group)
    for layer in base.model.layers:
        for _, m in layer.named_modules():
            if type(m) is ShardedToAllLinear:
                m.__class__ = CommShardedToAll
                m.comm = comm


def shard(model, comm: Comm, parallel: str, weights: list[float] | None = None) -> str:
    """Split ``model`` (a ``MedusaModel``) across the group in place; returns a description.

    Call it on every rank, then decode as usual on every rank (same prompt, same seed).
    """
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"--parallel '{parallel}': use {' or '.join(PARALLEL_MODES)}")
    if comm.size == 1:
        mx.eval(model.base.parameters())
        return "1 rank: not split"
    if parallel == "pipeline":
        start, end = pipeline(model.base, comm, weights)
        what = f"pipeline rank {comm.rank}/{comm.size}: layers {start}-{end}"
    else:
        tensor(model.base, comm)
        what = f"tensor rank {comm.rank}/{comm.size}"
    mx.eval(model.base.parameters())
    comm.barrier("waiting for the other ranks to load", LOAD_TIMEOUT_S)
    return what


def split_weights(spec: str, comm: Comm) -> list[float] | None:
    """``--pipeline-split``: "even", "memory" (each rank's, gathered) or one weight per rank."""
    if spec == "even":
        return None
    if spec == "memory":
        mine = mx.array([memory_gb()], dtype=mx.float32)
        return comm.all_gather(mine, "gathering the ranks' memory").tolist()
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise ValueError(f"--pipeline-split '{spec}': use even, memory, or one number per rank") from None
    if len(weights) != comm.size:
        raise ValueError(f"--pipeline-split has {len(weights)} weights for {comm.size} ranks: give one per rank")
    return weights


def memory_gb() -> float:
    """This machine's memory for weights: the GPU's on Apple silicon, else available RAM."""
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    if info.get("memory_size"):
        return info["memory_size"] / 1e9
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1e6
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def agree_seed(comm: Comm, seed: int | None) -> int:
    """The seed every rank samples with: ``seed``, or one drawn by rank 0."""
    if seed is not None:
        return seed
    mine = int(np.random.SeedSequence().entropy % 2**31) if comm.rank == 0 else 0
    return int(comm.all_sum(mx.array(mine, dtype=mx.int32), "agreeing on a seed").item())


def agree_plan(comm: Comm, model):
    """``model`` with rank 0's dynamic-tree costs and calibration on every rank: a rank picks each step's
    tree from them, and ranks on different machines (or with other tuned files) must pick alike."""
    plan = model.tree
    if not isinstance(plan, DynamicTree) or comm.size == 1:
        return model
    cal = plan.calibration
    mine = np.concatenate([plan.cost, cal.log_scale, cal.power]).astype(np.float32)
    got = np.array(comm.all_sum(mx.array(mine if comm.rank == 0 else np.zeros_like(mine)), "agreeing on the tree"))
    n, d = len(plan.cost), len(cal.power)
    agreed = Calibration(tuple(float(x) for x in got[n : n + d]), tuple(float(x) for x in got[n + d :]))
    return model.with_tree(replace(plan, cost=got[:n].astype(np.float64), calibration=agreed, _trees={}))


def check_agreement(comm: Comm, tokens: list[int]) -> None:
    """Raise if the ranks emitted different tokens (different hardware can round differently)."""
    digest = zlib.crc32(np.asarray(tokens, dtype=np.int64).tobytes()) & 0x7FFFFFFF
    got = comm.all_gather(mx.array([digest, len(tokens)], dtype=mx.int32)[None], "comparing tokens").tolist()
    if any(g != got[0] for g in got):
        raise RuntimeError(f"the ranks emitted different tokens ({got}): their logits differ; "
                           "run every rank on the same kind of hardware and dtype")


# --------------------------------------------------------------------------- mlx_medusa generate --parallel


def run_cli(args, run) -> None:
    """``mlx_medusa generate --parallel``: ``run`` (``generate.run``) on every rank, rank 0 printing.

    The model loads lazily; each rank then keeps and reads its share.
    """
    from .loading import load

    if args.backend == "torch" or args.device:
        sys.exit("error: --parallel runs on MLX (mx.distributed): drop --backend torch / --device")
    if args.parallel != "pipeline" and args.pipeline_split != "even":
        sys.exit("error: --pipeline-split is for --parallel pipeline")
    if args.prompt == "-":
        sys.exit("error: --prompt - (stdin) reaches one rank only; with --parallel give the prompt as text")
    try:
        comm = init(args.dist_timeout)
        if comm.rank != 0:  # rank 0 prints; the others are silent
            args.verbose = args.json = False
            sys.stdout = open(os.devnull, "w")
        args.seed = agree_seed(comm, args.seed)
        weights = split_weights(args.pipeline_split, comm)
    except ValueError as e:
        sys.exit(f"error: {e}")
    layout = {}

    def sharded_load(a):
        model, tokenizer = load(a.model, heads=a.heads, tree=a.tree, dtype=a.dtype, lazy=True)
        layout["layout"] = shard(model, comm, a.parallel, weights)
        return agree_plan(comm, model), tokenizer

    def agreed(*a, **kw):
        tokens = []
        for r in stream_generate(*a, **kw):
            tokens.append(r.token)
            yield r
        check_agreement(comm, tokens)

    def facts(model) -> dict:
        return {"parallel": args.parallel, "ranks": comm.size, "comm_seconds": comm.seconds, **layout}

    try:
        run(args, sharded_load, agreed, facts)
    except RuntimeError as e:  # the ring backend's "connection to a peer was lost", a disagreement
        sys.exit(f"error: rank {comm.rank}: {e}")
