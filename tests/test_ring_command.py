"""The ``mlx_medusa ring`` / ``node`` commands (``ring/command.py``, ``ring/launcher.py``) as processes
on a tiny model: the --json answer equals generate_step, and no node outlives the launcher (normal
exit, Ctrl-C, or the launcher killed). Plus the launcher's and the wire format's pure parts."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("grpc")
pytest.importorskip("torch")

from exo_medusa_mlx.exo import Shard  # noqa: E402
from exo_medusa_mlx.engine import protocol as st  # noqa: E402
from exo_medusa_mlx.model import MedusaModel  # noqa: E402
from exo_medusa_mlx.ring import node, proto  # noqa: E402
from exo_medusa_mlx.ring.client import NodeInfo, RingClient  # noqa: E402
from exo_medusa_mlx.engine.shard import partition_layers  # noqa: E402
from exo_medusa_mlx.core.tree import build_tree, tree_choices  # noqa: E402
from helpers.folders import save_hf_folder  # noqa: E402
from helpers.oracle import N, PROMPT, reference  # noqa: E402
from helpers.processes import gone  # noqa: E402
from helpers.tiny import N_LAYERS, random_heads, tiny_base  # noqa: E402

TEXT = " ".join(f"t{i}" for i in PROMPT)  # the word-level tokenizer's spelling of PROMPT
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base, heads = tiny_base("llama", layers=N_LAYERS), random_heads(4)
    folder = save_hf_folder(tmp_path_factory.mktemp("tiny") / "llama", "llama", base, heads)
    return folder, reference(MedusaModel(base, heads, build_tree(tree_choices("cpu-8"))))


class Launcher:
    """``python -m exo_medusa_mlx.ring.command`` with its output read as it comes."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "exo_medusa_mlx.ring.command", *args], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: queue.Queue = queue.Queue()
        self.err: list[str] = []
        self.pids: list[int] = []
        threading.Thread(target=lambda: [self.out.put(c) for c in iter(lambda: self.proc.stdout.read(1), "")],
                         daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self.err.append(line)
            if " pid " in line:
                self.pids.append(int(line.rsplit(" pid ", 1)[1]))

    def wait_for(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.kill()
                pytest.fail(f"launcher: no {what} (exit {self.proc.returncode}):\n{''.join(self.err)[-3000:]}")
            time.sleep(0.05)

    def stdout(self) -> str:
        chunks = []
        while not self.out.empty():
            chunks.append(self.out.get())
        return "".join(chunks)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def launch(folder, nodes: int, backends: str, *extra: str) -> Launcher:
    return Launcher("--model", str(folder), "--nodes", str(nodes), "--backends", backends, "--tree", "cpu-8",
                    "--threads", "1", "--prompt", TEXT, *extra)


def test_ring_json_equals_generate_step_and_nodes_exit(tiny):
    folder, ref = tiny
    run = launch(folder, 2, "mlx,torch", "--max-tokens", str(N), "--json")
    try:
        run.proc.wait(timeout=150)
    finally:
        run.kill()
    out = run.stdout()
    assert run.proc.returncode == 0, "".join(run.err)[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["tokens"] == ref
    assert result["text"].split() == [f"t{i}" for i in ref]
    assert [(n["backend"], n["start_layer"], n["end_layer"]) for n in result["nodes"]] == [
        ("mlx", 0, 1), ("torch", 2, 3)]
    assert result["mean_accepted"] >= 1.0 and result["passes"] >= 1
    assert any("mean accepted length" in line for line in run.err)
    assert len(run.pids) == 2 and all(gone(p, 5) for p in run.pids)


@pytest.mark.parametrize("how", ["ctrl-c", "launcher killed"])
def test_no_node_outlives_the_launcher(tiny, how):
    folder, _ = tiny
    # a window, so the generation cannot end first (the tiny model's context is 512 tokens)
    run = launch(folder, 1, "mlx", "--max-tokens", "100000000", "--no-medusa", "--max-kv-size", "64")
    try:
        run.wait_for(lambda: not run.out.empty(), 120, "streamed text")  # generating
        assert len(run.pids) == 1
        if how == "ctrl-c":
            run.proc.send_signal(signal.SIGINT)
            assert run.proc.wait(timeout=60) == 130  # seconds on a loaded 2-core machine
        else:  # the nodes' stdin closes with the launcher: they exit on their own
            run.proc.kill()
            run.proc.wait()
        assert gone(run.pids[0], 15)
    finally:
        run.kill()
        for pid in run.pids:
            if not gone(pid, 0.1):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- pure parts


def test_last_node_takes_the_tree_tuned_for_its_backend(tmp_path):
    """A torch last shard reads ``tree.torch.json`` beside the heads, an MLX one ``tree.json``."""
    (tmp_path / "tree.json").write_text("[[0], [1]]")
    (tmp_path / "tree.torch.json").write_text("[[0]]")
    assert node.resolve_heads_and_tree("m", str(tmp_path), None, "torch")[1] == str(tmp_path / "tree.torch.json")
    assert node.resolve_heads_and_tree("m", str(tmp_path), None, "mlx")[1] == str(tmp_path / "tree.json")
    assert node.resolve_heads_and_tree("m", str(tmp_path), "cpu-8", "torch")[1] == "cpu-8"


def test_last_node_prefers_the_tree_tuned_for_a_ring(tmp_path):
    """``tree.ring.json`` (tuned on a ring's per-pass cost) comes before the single-machine trees."""
    for name in ("tree.json", "tree.torch.json", "tree.ring.json"):
        (tmp_path / name).write_text("[[0]]")
    assert node.resolve_heads_and_tree("m", str(tmp_path), None, "mlx")[1] == str(tmp_path / "tree.ring.json")
    (tmp_path / "tree.ring.torch.json").write_text("[[0]]")
    assert node.resolve_heads_and_tree("m", str(tmp_path), None, "torch")[1] == str(tmp_path / "tree.ring.torch.json")


def test_nodes_on_one_host_share_its_cores(tiny, monkeypatch):
    """Idle threads sleep at once (a pass visits one node at a time); a user's own settings win."""
    from exo_medusa_mlx.ring.launcher import SHARE_CORES, LocalRing

    folder, _ = tiny
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "10")
    env = LocalRing(["mlx", "mlx"], str(folder))._env()
    assert env["OMP_WAIT_POLICY"] == SHARE_CORES["OMP_WAIT_POLICY"] and env["OPENBLAS_THREAD_TIMEOUT"] == "10"
    assert "OPENBLAS_NUM_THREADS" not in env or env["OPENBLAS_NUM_THREADS"] == __import__("os").environ.get(
        "OPENBLAS_NUM_THREADS")  # every node may use every core
    assert LocalRing(["mlx"], str(folder), threads=1)._env()["OPENBLAS_NUM_THREADS"] == "1"


def test_partition_layers():
    assert partition_layers(30, [1, 1, 1]) == [(0, 9), (10, 19), (20, 29)]
    assert partition_layers(30, [1, 1]) == [(0, 14), (15, 29)]
    assert partition_layers(4, [2, 1, 1]) == [(0, 1), (2, 2), (3, 3)]
    assert partition_layers(30, [16, 8]) == [(0, 19), (20, 29)]  # by memory
    assert partition_layers(3, [100, 1, 1]) == [(0, 0), (1, 1), (2, 2)]  # every node keeps a layer
    with pytest.raises(ValueError, match="cannot split 2 layers over 3 nodes"):
        partition_layers(2, [1, 1, 1])
    with pytest.raises(ValueError, match="must be positive"):
        partition_layers(4, [1, 0])


def test_wire_round_trip_and_refusals():
    state = {**st.initial_state(0.5, 0.9, "typical", 3, True), st.COMMIT: np.array([0, 2]),
             st.POSITIONS: np.arange(5, 8), "exo_key": "kept"}
    back = proto.state_from_proto(proto.state_to_proto(state))
    assert back.keys() == state.keys()
    assert all(np.array_equal(back[k], v) if isinstance(v, np.ndarray) else back[k] == v for k, v in state.items())
    x = np.random.default_rng(0).normal(size=(1, 3, 8)).astype(np.float32)
    assert np.array_equal(proto.tensor_from_proto(proto.tensor_to_proto(x)), x)
    s = Shard("m", 2, 5, 8)
    assert proto.shard_from_proto(proto.shard_to_proto(s)) == s
    with pytest.raises(ValueError, match="outside its 8 layers"):
        proto.shard_from_proto(proto.pb.Shard(model_id="m", start_layer=5, end_layer=8, n_layers=8))
    with pytest.raises(ValueError, match="only arrays, lists of arrays and JSON values travel"):
        proto.state_to_proto({"obj": object()})


def test_defaults_bind_loopback_and_clients_check_the_ring():
    args = node.setup_arg_parser().parse_args([])
    assert args.host == "127.0.0.1" and args.backend == "mlx"
    a, b = Shard("m", 0, 1, 4), Shard("m", 3, 3, 4)
    with pytest.raises(ValueError, match="expected a shard starting at 2"):
        RingClient([NodeInfo("127.0.0.1:1", a), NodeInfo("127.0.0.1:2", b)])
    with pytest.raises(ValueError, match="leaves no time per hop"):
        RingClient([NodeInfo("127.0.0.1:1", Shard("m", 0, 3, 4))], timeout=0.5)
