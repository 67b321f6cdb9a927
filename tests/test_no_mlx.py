"""An NVIDIA node has torch but maybe no MLX: the torch path, its exo engine and a torch ring node
must import and run end to end with ``mlx`` made unimportable, with the same tokens as MLX."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("grpc")

from exo_medusa_mlx.core.tree import build_tree, tree_choices  # noqa: E402
from exo_medusa_mlx.model import MedusaModel  # noqa: E402
from helpers.folders import save_hf_folder  # noqa: E402
from helpers.oracle import N, PROMPT, reference  # noqa: E402
from helpers.tiny import N_LAYERS, random_heads, tiny_base  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = " ".join(f"t{i}" for i in PROMPT)  # the word-level tokenizer's spelling of PROMPT

IMPORTS = """
import sys, warnings
warnings.simplefilter("ignore")
from exo_medusa_mlx.torch_compat import load, stream_generate
import exo_medusa_mlx.exo as exo
assert exo.MedusaTorchInferenceEngine.__name__ == "MedusaTorchInferenceEngine"
from exo_medusa_mlx.ring import node
try:
    exo.MedusaMLXInferenceEngine
except ImportError:
    print("mlx engine refused")
assert not any(m == "mlx" or m.startswith(("mlx.", "mlx_lm")) for m in sys.modules if sys.modules[m] is not None)
print("ok")
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model folder with heads, and MLX's greedy Medusa tokens for it (the oracle)."""
    base, heads = tiny_base("llama", layers=N_LAYERS), random_heads(4)
    folder = save_hf_folder(tmp_path_factory.mktemp("tiny") / "llama", "llama", base, heads)
    return folder, reference(MedusaModel(base, heads, build_tree(tree_choices("cpu-8"))))


@pytest.fixture(scope="module")
def no_mlx_path(tmp_path_factory) -> str:
    """A PYTHONPATH whose first folder holds ``mlx`` and ``mlx_lm`` packages that refuse to import."""
    blocker = tmp_path_factory.mktemp("no_mlx")
    for name in ("mlx", "mlx_lm"):
        (blocker / name).mkdir()
        (blocker / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here (test)')\n")
    return os.pathsep.join([str(blocker), ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])


def run(code_or_args, path: str, timeout: float = 300) -> subprocess.CompletedProcess:
    argv = ["-c", code_or_args] if isinstance(code_or_args, str) else ["-m", "exo_medusa_mlx", *code_or_args]
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"})


def test_torch_side_imports_without_mlx(no_mlx_path):
    p = run(IMPORTS, no_mlx_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["mlx", "engine", "refused", "ok"]


def test_generate_backend_torch_without_mlx(tiny, no_mlx_path):
    folder, ref = tiny
    p = run(["generate", "--backend", "torch", "--model", str(folder), "--tree", "cpu-8", "--prompt", TEXT,
             "--ignore-chat-template", "--max-tokens", str(N), "--json"], no_mlx_path)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["backend"] == "torch" and out["medusa"] and out["tokens"] == ref


def test_torch_ring_nodes_without_mlx(tiny, no_mlx_path, monkeypatch):
    """Two torch node processes, the last with the heads: the exo engine end to end over gRPC."""
    from exo_medusa_mlx.ring.launcher import LocalRing

    folder, ref = tiny
    monkeypatch.setenv("PYTHONPATH", no_mlx_path)  # the node processes inherit it
    with LocalRing(["torch", "torch"], model=str(folder), tree="cpu-8", threads=1, start_timeout=240) as ring:
        assert "Medusa heads" in ring.medusa()
        with ring.client() as client:
            result = client.generate(np.asarray(PROMPT), N, True)
    assert result.tokens == ref and result.passes < N - 1  # several tokens on some passes
