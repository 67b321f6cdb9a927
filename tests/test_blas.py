"""MLX's BLAS on Linux (``_blas.py``): ``setup_blas()`` loads OpenBLAS through a compiled shim (MLX's
products are then OpenBLAS's, bit for bit), cached, and skipped with a reason without a compiler,
when turned off or when mlx was imported first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import exo_medusa_mlx

REPO_ROOT = Path(exo_medusa_mlx.__file__).resolve().parent.parent


def _run_py(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


# MLX's float32 product against OpenBLAS's sgemm called directly on the same inputs: the same kernels give
# the same bits, MLX's reference BLAS (another summation order) does not.
_BLAS_PROBE = """
import ctypes
import numpy as np
import exo_medusa_mlx
from exo_medusa_mlx._blas import _openblas, blas_info
exo_medusa_mlx.setup_blas()
import mlx.core as mx
rng = np.random.default_rng(0)
M, K, N = 256, 384, 320
a, b = rng.standard_normal((M, K), dtype=np.float32), rng.standard_normal((K, N), dtype=np.float32)
got = np.array(mx.array(a) @ mx.array(b))
gemm = ctypes.CDLL(str(_openblas())).scipy_cblas_sgemm
ptr = ctypes.c_void_p
gemm.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ptr, ctypes.c_int, ptr, ctypes.c_int, ctypes.c_float, ptr,
                                      ctypes.c_int]
want = np.zeros((M, N), np.float32)
gemm(101, 111, 111, M, N, K, 1.0, a.ctypes.data, K, b.ctypes.data, N, 0.0, want.ctypes.data, N)  # row-major
print(blas_info()); print(np.array_equal(got, want))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenBLAS preload is Linux-only (macOS uses Accelerate)")
def test_setup_blas_gives_openblas(tmp_path):
    from importlib import metadata

    for dist in ("mlx-cuda-12", "mlx-cuda-13"):
        try:
            metadata.distribution(dist)
            pytest.skip(f"{dist} installed: preload is a no-op on the CUDA build")
        except metadata.PackageNotFoundError:
            pass
    res = _run_py(_BLAS_PROBE, EXO_MEDUSA_CACHE=str(tmp_path), EXO_MEDUSA_BLAS="")
    assert res.returncode == 0, res.stderr
    info, same = res.stdout.split("\n")[:2]
    assert info.startswith("openblas"), info
    assert same == "True", f"{info}: MLX's matmul is not OpenBLAS's"
    off = _run_py(_BLAS_PROBE, EXO_MEDUSA_CACHE=str(tmp_path), EXO_MEDUSA_BLAS="off")
    assert off.stdout.split("\n")[:2] == ["reference (EXO_MEDUSA_BLAS=off)", "False"], off.stdout + off.stderr
    assert list((tmp_path / "blas").glob("*/libexo_medusa_cblas.so")), "shim not cached"
    assert not list((tmp_path / "blas").glob("*/.*")), "temporary files left behind"
    again = _run_py(_BLAS_PROBE, EXO_MEDUSA_CACHE=str(tmp_path), EXO_MEDUSA_BLAS="")
    assert again.stdout.split("\n")[0] == info  # the cached shim is reused


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenBLAS preload is Linux-only (macOS uses Accelerate)")
def test_setup_blas_without_a_compiler_keeps_the_reference(tmp_path):
    res = _run_py(
        "import exo_medusa_mlx; print(exo_medusa_mlx.setup_blas())",
        EXO_MEDUSA_CACHE=str(tmp_path), EXO_MEDUSA_BLAS="", CC="", PATH=str(tmp_path),
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "reference (no C compiler to build the BLAS shim: install gcc or set CC)"
    assert not (tmp_path / "blas").exists()


def test_setup_blas_off_and_too_late():
    res = _run_py("import exo_medusa_mlx; print(exo_medusa_mlx.setup_blas())", EXO_MEDUSA_BLAS="off")
    assert res.stdout.strip() in ("reference (EXO_MEDUSA_BLAS=off)", "accelerate (macOS)")
    if sys.platform.startswith("linux"):
        res = _run_py(
            "import mlx.core, warnings; warnings.simplefilter('always')\n"
            "import exo_medusa_mlx; print(exo_medusa_mlx.setup_blas())"
        )
        assert res.stdout.strip().startswith("reference"), res.stdout
        assert "imported before exo_medusa_mlx" in res.stderr
