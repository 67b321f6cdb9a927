"""exo 0.0.x's own node as processes on this machine, for the tests and ``scripts/bench_exo_ring.py``.

``exo_source()`` finds exo's source (``$EXO_SRC``: an unpacked tree, a tarball, or a folder
holding one; else ``../shared/exo-0.0.x/`` beside the checkout) and unpacks a tarball once into
the project's cache. ``ExoRing`` starts N ``exo/main.py`` processes on loopback (manual
discovery, exo's downloader seeded offline with the default model), stock (``STOCK``) or under
``mlx_medusa exo`` (``MEDUSA``), waits until every node's API sees the ring, asks its
``/v1/chat/completions`` and reads the ``exo-medusa: request`` lines the last node prints.
exo is GPL-3.0: nothing of it is copied here, it is only run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from exo_medusa_mlx.core.machine import free_ports
from exo_medusa_mlx.exo.cards import DEFAULT_CARD

ROOT = Path(__file__).resolve().parents[2]  # the checkout
DEFAULT_SRC = ROOT.parent / "shared" / "exo-0.0.x"
# What a node needs to import exo's node, networking and API (the project's `exo` extra).
EXO_MODULES = ("exo.orchestration.node", "exo.networking.grpc.grpc_server", "exo.api.chatgpt_api",
               "exo.download.new_shard_download")
STOCK = [sys.executable, "-c", "import runpy, sys; from exo_medusa_mlx.exo.registry import register_with_exo; "
         "print(register_with_exo(), flush=True); sys.argv = ['exo', *sys.argv[1:]]; "
         "runpy.run_module('exo.main', run_name='__main__')"]  # exo's own node, our engines registered
MEDUSA = [sys.executable, "-m", "exo_medusa_mlx.cli", "exo"]
PASSES = re.compile(r"exo-medusa: request (\S+): (\d+) tokens in (\d+) ring passes")


def _tree_root(folder: Path) -> Path | None:
    for cand in (folder, folder / "src"):
        if (cand / "exo" / "main.py").is_file() and (cand / "exo" / "orchestration" / "node.py").is_file():
            return cand
    return None


def _unpack(tarball: Path) -> Path | None:
    from exo_medusa_mlx.core.machine import cache_root

    st = tarball.stat()
    key = hashlib.sha1(f"{tarball.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = cache_root() / "exo-src" / f"{tarball.name.split('.')[0]}-{key}"
    if _tree_root(dest) is None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        with tarfile.open(tarball) as tf:
            tf.extractall(tmp, filter="data")
        try:
            os.replace(tmp, dest)
        except OSError:  # another process unpacked it first
            shutil.rmtree(tmp, ignore_errors=True)
    return _tree_root(dest)


def exo_source() -> tuple[Path | None, str]:
    """(the folder that holds ``exo/``, or None; why not, in one line)."""
    given = os.environ.get("EXO_SRC")
    where = Path(given).expanduser() if given else DEFAULT_SRC
    label = f"EXO_SRC={given}" if given else str(where)
    if where.is_file() and where.name.endswith((".tar.gz", ".tgz")):
        return _unpack(where), ""
    if not where.is_dir():
        return None, (f"exo 0.0.x source not found ({label}); set EXO_SRC to its tree or tarball "
                      f"(exo-explore/exo at tag v0.0.15-alpha), or put it in {DEFAULT_SRC}")
    root = _tree_root(where)
    if root is not None:
        return root, ""
    tarballs = sorted(where.glob("exo-src-*.tar.gz"))
    if not tarballs:
        return None, f"{label} holds neither exo's tree (exo/main.py) nor an exo-src-*.tar.gz; set EXO_SRC to one"
    return _unpack(tarballs[-1]), ""


def exo_env(src: Path, home: Path, threads: int = 1, **extra: str) -> dict[str, str]:
    """A node's environment: exo on the path, offline, its home and temp files under ``home``,
    ``threads`` BLAS / OpenMP threads (nodes on one host share its cores)."""
    tmp = home / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(ROOT)]), "DEV": "PYTHON",
           "EXO_HOME": str(home), "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.update(dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"), str(threads)))
    env.update(extra)
    return env


def missing_imports(src: Path) -> str:
    """Why a node could not import exo's node and API here (a missing package), or ""."""
    code = f"import importlib; [importlib.import_module(m) for m in {list(EXO_MODULES)!r}]"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(ROOT)]), "DEV": "PYTHON"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if r.returncode == 0:
        return ""
    last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
    return f"exo's imports failed ({last}); pip install -e '.[exo]'"


def seed_download(home: Path, repo_id: str, folder: Path) -> Path:
    """Let exo's downloader serve ``folder`` as ``repo_id`` with no network: the folder linked
    under ``$EXO_HOME/downloads``, exo's cached file list, and the weight index exo asks for
    first (under ``$TMPDIR/exo``, where exo caches both)."""
    from safetensors import safe_open

    name = repo_id.replace("/", "--")
    downloads = home / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    link = downloads / name
    if not link.exists():
        link.symlink_to(folder.resolve(), target_is_directory=True)
    cache = home / "tmp" / "exo"
    (cache / name).mkdir(parents=True, exist_ok=True)
    files = [{"path": p.relative_to(folder).as_posix(), "size": p.stat().st_size}
             for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    (cache / f"{name}--main--file_list.json").write_text(json.dumps(files))
    weight_map = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as sf:
            weight_map.update({k: f.name for k in sf.keys()})
    (cache / name / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return link


def write_topology(path: Path, ports: dict[str, int]) -> Path:
    import psutil

    # The memory each node reports for itself, so that every node computes the same partition.
    memory = psutil.virtual_memory().total // 2**20
    caps = {"model": "Linux Box", "chip": "cpu", "memory": memory, "flops": {"fp32": 0, "fp16": 0, "int8": 0}}
    peers = {nid: {"address": "127.0.0.1", "port": p, "device_capabilities": caps} for nid, p in ports.items()}
    path.write_text(json.dumps({"peers": peers}))
    return path


class ExoNode:
    """One ``exo/main.py`` process (``launch``: the command that starts it), output to a log file."""

    def __init__(self, launch: Sequence[str], node_id: str, node_port: int, api_port: int, topology: Path,
                 engine: str, env: dict[str, str], log: Path, *extra: str, max_tokens: int = 12,
                 response_timeout: int = 90):
        self.node_id, self.api_port, self.log = node_id, api_port, log
        args = ["--node-id", node_id, "--node-host", "127.0.0.1", "--node-port", str(node_port),
                "--chatgpt-api-port", str(api_port), "--discovery-module", "manual",
                "--discovery-config-path", str(topology), "--inference-engine", engine, "--disable-tui",
                "--chatgpt-api-response-timeout", str(response_timeout), "--max-generate-tokens", str(max_tokens),
                *extra]
        self._out = open(log, "w")
        self.proc = subprocess.Popen([*launch, *args], cwd=str(log.parent), env=env, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """Killed: exo's graceful shutdown waits seconds for its gRPC server, and nothing needs it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._out.close()


def wait_for_ring(node: ExoNode, n_nodes: int, timeout: float = 180.0) -> None:
    """Until ``node``'s API answers and its topology holds ``n_nodes`` nodes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.proc.poll() is not None:
            raise RuntimeError(f"exo node {node.node_id} exited ({node.proc.returncode}):\n{node.text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{node.api_port}/v1/topology", timeout=5) as r:
                if len(json.loads(r.read()).get("nodes", {})) >= n_nodes:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"exo node {node.node_id} saw no {n_nodes}-node ring in {timeout:.0f}s:\n{node.text()[-3000:]}")


@dataclass(frozen=True)
class Reply:
    """One answer of exo's chat API."""

    request_id: str  # exo's, as its nodes log it
    text: str
    tokens: int  # exo's usage.completion_tokens
    seconds: float  # the request, end to end (prefill included)


def chat(node: ExoNode, model: str, content: str, timeout: float = 300.0) -> Reply:
    """exo's ``/v1/chat/completions``, greedy (exo samples at the node's --default-temp, 0)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0.0})
    req = urllib.request.Request(f"http://127.0.0.1:{node.api_port}/v1/chat/completions", data=body.encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"exo node {node.node_id} answered HTTP {e.code}: {e.read()[:500]!r}") from None
    seconds = time.perf_counter() - t0
    return Reply(out["id"].removeprefix("chatcmpl-"), out["choices"][0]["message"]["content"],
                 out["usage"]["completion_tokens"], seconds)


class ExoRing:
    """``len(engines)`` exo nodes on loopback serving the default model, in ring order (the first
    holds the first layers), each started by ``launch`` (``STOCK`` or ``MEDUSA``); a context
    manager that stops them all.

    Args:
        src: exo's source folder (``exo_source()``).
        home: a folder for the nodes' homes, topology and logs.
        engines: exo engine names, one per node ("medusa-mlx", "medusa-torch").
        max_tokens: the nodes' ``--max-generate-tokens``.
        threads: BLAS / OpenMP threads per node.
    """

    def __init__(self, src: Path, home: Path, launch: Sequence[str], engines: Sequence[str], *,
                 max_tokens: int = 12, threads: int = 1, response_timeout: int = 90, start_timeout: float = 180.0):
        from exo_medusa_mlx.default_model import DEFAULT_MODEL_ID, default_model_path

        self.card, self.nodes = DEFAULT_CARD, []
        n = len(engines)
        home.mkdir(parents=True, exist_ok=True)
        env = exo_env(src, home, threads)
        seed_download(home, DEFAULT_MODEL_ID, default_model_path())
        ids = [f"node{n - i}" for i in range(n)]  # exo orders nodes of equal memory by id, descending
        ports = free_ports(2 * n)
        topology = write_topology(home / "topology.json", dict(zip(ids, ports)))
        try:
            for i, (node_id, engine) in enumerate(zip(ids, engines)):
                self.nodes.append(ExoNode(launch, node_id, ports[i], ports[n + i], topology, engine, env,
                                          home / f"{node_id}.log", "--wait-for-peers", str(n - 1),
                                          max_tokens=max_tokens, response_timeout=response_timeout))
            for node in self.nodes:
                wait_for_ring(node, n, start_timeout)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "ExoRing":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ask(self, content: str, at: int = 0, timeout: float = 900.0) -> Reply:
        """Ask node ``at`` (0: the one holding the first layers; -1: the last)."""
        return chat(self.nodes[at], self.card, content, timeout)

    def logs(self) -> str:
        return "".join(node.text() for node in self.nodes)

    def passes(self, wait: float = 5.0, expect: Sequence[str] = ()) -> dict[str, tuple[int, int]]:
        """request ID -> (tokens, ring passes), from the lines the last node prints under
        ``mlx_medusa exo``; waits up to ``wait`` seconds for the IDs in ``expect``."""
        deadline = time.monotonic() + wait
        while True:
            found = {rid: (int(t), int(p)) for rid, t, p in PASSES.findall(self.logs())}
            if all(rid in found for rid in expect) or time.monotonic() > deadline:
                return found
            time.sleep(0.1)

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
