"""An NVIDIA node has torch but maybe no MLX: the torch path and its exo engine must import."""

import subprocess
import sys

import pytest

CODE = """
import sys, warnings
warnings.simplefilter("ignore")
for m in ("mlx", "mlx.core", "mlx.nn", "mlx_lm"):
    sys.modules[m] = None  # import mlx now fails, as on a machine without it
from exo_medusa_mlx.torch_compat import load, stream_generate
import exo_medusa_mlx.exo as exo
assert exo.MedusaTorchInferenceEngine.__name__ == "MedusaTorchInferenceEngine"
from exo_medusa_mlx.ring import node
try:
    exo.MedusaMLXInferenceEngine
except ImportError:
    print("mlx engine refused")
print("ok")
"""


def test_torch_side_imports_without_mlx():
    pytest.importorskip("torch")
    p = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["mlx", "engine", "refused", "ok"]
