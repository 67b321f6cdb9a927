"""exo 0.0.x's own source for integration tests: found, unpacked outside the repository, run.

``exo_source()`` finds it (``$EXO_SRC``: an unpacked tree, a tarball, or a folder holding
one; else ``../shared/exo-0.0.x/`` beside the repository) and unpacks a tarball once into
the project's cache. ``seed_download`` lets exo's own downloader serve a local folder
offline; ``ExoNode`` runs one ``exo/main.py`` process; ``chat`` asks its API.
exo is GPL-3.0: nothing of it is copied here, it is only run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SRC = ROOT.parent / "shared" / "exo-0.0.x"
MAX_TOKENS = 12  # per chat request: short, and enough for several Medusa passes


def _tree_root(folder: Path) -> Path | None:
    for cand in (folder, folder / "src"):
        if (cand / "exo" / "main.py").is_file() and (cand / "exo" / "orchestration" / "node.py").is_file():
            return cand
    return None


def _unpack(tarball: Path) -> Path:
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
    """(the folder that holds ``exo/``, or None; why not)."""
    given = os.environ.get("EXO_SRC")
    where = Path(given).expanduser() if given else DEFAULT_SRC
    label = f"EXO_SRC={given}" if given else str(where)
    if where.is_file() and where.name.endswith((".tar.gz", ".tgz")):
        return _unpack(where), ""
    if not where.is_dir():
        return None, f"exo 0.0.x source not found ({label}); set EXO_SRC to its tree or tarball"
    root = _tree_root(where)
    if root is not None:
        return root, ""
    tarballs = sorted(where.glob("exo-src-*.tar.gz"))
    if not tarballs:
        return None, f"{label} holds neither exo's tree nor an exo-src-*.tar.gz"
    return _unpack(tarballs[-1]), ""


def exo_env(src: Path, home: Path, **extra: str) -> dict[str, str]:
    """A node's environment: exo on the path, offline, its home and temp files under ``home``,
    one BLAS / OpenMP thread (two nodes share two cores)."""
    tmp = home / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(ROOT)]), "DEV": "PYTHON",
           "EXO_HOME": str(home), "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.update(extra)
    return env


def seed_download(home: Path, repo_id: str, folder: Path) -> Path:
    """Let exo's downloader serve ``folder`` as ``repo_id`` with no network: the folder linked
    under ``$EXO_HOME/downloads``, exo's cached file list, and the weight index exo asks for
    first (under ``$TMPDIR/exo``, where exo caches both)."""
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
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as sf:
            weight_map.update({k: f.name for k in sf.keys()})
    (cache / name / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return link


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_topology(path: Path, ports: dict[str, int]) -> Path:
    import psutil

    # The memory each node reports for itself, so that every node computes the same partition.
    memory = psutil.virtual_memory().total // 2**20
    caps = {"model": "Linux Box", "chip": "cpu", "memory": memory, "flops": {"fp32": 0, "fp16": 0, "int8": 0}}
    peers = {nid: {"address": "127.0.0.1", "port": p, "device_capabilities": caps} for nid, p in ports.items()}
    path.write_text(json.dumps({"peers": peers}))
    return path


class ExoNode:
    """One ``exo/main.py`` process (``launch``: the Python that starts it), output to a log file."""

    def __init__(self, launch: list[str], node_id: str, node_port: int, api_port: int, topology: Path,
                 engine: str, env: dict[str, str], log: Path, *extra: str):
        self.node_id, self.api_port, self.log = node_id, api_port, log
        args = ["--node-id", node_id, "--node-host", "127.0.0.1", "--node-port", str(node_port),
                "--chatgpt-api-port", str(api_port), "--discovery-module", "manual",
                "--discovery-config-path", str(topology), "--inference-engine", engine, "--disable-tui",
                "--chatgpt-api-response-timeout", "90", "--max-generate-tokens", str(MAX_TOKENS), *extra]
        self._out = open(log, "w")
        self.proc = subprocess.Popen([*launch, *args], cwd=str(ROOT), env=env, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """Killed: exo's graceful shutdown waits seconds for its gRPC server, and tests need none."""
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


def chat(node: ExoNode, model: str, content: str, timeout: float = 300.0) -> str:
    """exo's ``/v1/chat/completions``, greedy (exo samples at the node's --default-temp, 0)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0.0})
    req = urllib.request.Request(f"http://127.0.0.1:{node.api_port}/v1/chat/completions", data=body.encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())["choices"][0]["message"]["content"]
    except urllib.error.HTTPError as e:
        raise AssertionError(f"exo answered HTTP {e.code}: {e.read()[:500]!r}") from None


def python_launch(code: str) -> list[str]:
    return [sys.executable, "-c", code]
