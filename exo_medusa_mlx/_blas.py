"""Give MLX an optimized BLAS on Linux, before ``mlx.core`` is imported (this module imports no mlx).

Nothing happens on import: ``setup_blas()`` is called by the entry points that run MLX
(``cli.main``, MLX's ``load()``, the MLX shard engine's importers, ``backends``), before
they import ``mlx``; once ``mlx.core`` is loaded, MLX keeps the BLAS it linked.

``mlx[cpu]`` links a reference BLAS, ~50x slower than OpenBLAS for a float32 GEMM. We
load ``scipy-openblas32`` (numpy's OpenBLAS: kernels picked for the CPU at run time) and a
three-function shim giving its ``scipy_``-prefixed ``cblas_{s,d,c}gemm`` MLX's names,
compiled once with ``$CC``/``cc`` and cached, with ``RTLD_GLOBAL``. Without a compiler MLX
keeps its reference BLAS and ``blas_info()`` says why; ``EXO_MEDUSA_BLAS=off`` disables it.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from importlib import metadata
from pathlib import Path

from .core.machine import cache_root

__all__ = ["setup_blas", "blas_info", "set_blas_threads"]

_INFO: str | None = None
_HANDLES: list[ctypes.CDLL] = []  # keep the libraries loaded for the process lifetime

# The CBLAS signatures MLX links against (mlx/backend/cpu), forwarded to OpenBLAS's prefixed ones.
_SHIM_SOURCE = """\
typedef int I;
#define FORWARD(NAME, T, S) \\
  void scipy_##NAME(int, int, int, I, I, I, S, const T *, I, const T *, I, S, T *, I); \\
  void NAME(int o, int ta, int tb, I m, I n, I k, S alpha, const T *a, I lda, const T *b, I ldb, \\
            S beta, T *c, I ldc) { scipy_##NAME(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc); }
FORWARD(cblas_sgemm, float, float)
FORWARD(cblas_dgemm, double, double)
FORWARD(cblas_cgemm, void, const void *)
"""


def _openblas() -> Path | None:
    """The installed ``scipy-openblas32`` shared library, if any."""
    try:
        root = Path(metadata.distribution("scipy-openblas32").locate_file("")) / "scipy_openblas32" / "lib"
    except metadata.PackageNotFoundError:
        return None
    return next(iter(sorted(root.glob("libscipy_openblas*.so"))), None)


def _has_dist(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        exe = shutil.which(cc.split()[0]) if cc else None
        if exe:
            return exe
    return None


def _shim(openblas: Path, cc: str) -> Path:
    """Return the cached shim linked against ``openblas``, compiling it on first use."""
    st = openblas.stat()
    key = hashlib.sha256(f"{openblas.resolve()}:{st.st_size}:{st.st_mtime_ns};{_SHIM_SOURCE}".encode())
    out_dir = cache_root() / "blas" / key.hexdigest()[:16]
    final = out_dir / "libexo_medusa_cblas.so"
    if final.is_file():
        return final
    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / f".shim.{os.getpid()}.c"
    tmp = out_dir / f".{final.name}.{os.getpid()}.tmp"
    try:
        src.write_text(_SHIM_SOURCE)
        lib_dir = str(openblas.parent)
        subprocess.run(
            [cc, "-shared", "-fPIC", "-O2", "-x", "c", str(src), "-o", str(tmp),
             f"-L{lib_dir}", f"-l:{openblas.name}", f"-Wl,-rpath,{lib_dir}"],
            check=True, capture_output=True, timeout=120,
        )
        os.replace(tmp, final)
    finally:
        src.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return final


def _describe(lib: ctypes.CDLL) -> str:
    version = metadata.version("scipy-openblas32")
    extra = ["scipy-openblas32"]
    try:
        lib.scipy_openblas_get_corename.restype = ctypes.c_char_p
        extra.append(lib.scipy_openblas_get_corename().decode())
        lib.scipy_openblas_get_num_threads.restype = ctypes.c_int
        extra.append(f"{lib.scipy_openblas_get_num_threads()} threads")
    except AttributeError:
        pass
    return f"openblas {version} ({', '.join(extra)})"


def _load_openblas() -> str:
    """Load OpenBLAS and the shim globally; return the description or a 'reference (...)' reason."""
    openblas = _openblas()
    if openblas is None:
        return "reference (scipy-openblas32 not installed)"
    cc = _compiler()
    if cc is None:
        return "reference (no C compiler to build the BLAS shim: install gcc or set CC)"
    try:
        shim = _shim(openblas, cc)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        return f"reference (BLAS shim did not build with {cc}: {detail.decode(errors='replace').strip()[:200] or e})"
    try:
        lib = ctypes.CDLL(str(openblas), mode=ctypes.RTLD_GLOBAL)
        _HANDLES.extend([lib, ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)])
    except OSError as e:
        return f"reference (OpenBLAS not loadable: {e})"
    return _describe(lib)


def setup_blas() -> str:
    """Load OpenBLAS for MLX (Linux CPU build only, before ``mlx.core``); return the BLAS description.

    Idempotent. Falls back to MLX's reference BLAS when anything is missing; the
    description then says ``reference (<why>)``. Called after ``mlx.core`` was
    imported, it changes nothing and warns (once).
    """
    global _INFO
    if _INFO is not None:
        return _INFO
    if sys.platform == "darwin":
        _INFO = "accelerate (macOS)"
    elif not sys.platform.startswith("linux"):
        _INFO = f"mlx default ({sys.platform})"
    elif os.environ.get("EXO_MEDUSA_BLAS", "").lower() in ("off", "0", "false", "reference"):
        _INFO = "reference (EXO_MEDUSA_BLAS=off)"
    elif importlib.util.find_spec("mlx") is None:
        _INFO = "none (mlx not installed)"
    elif _has_dist("mlx-cuda-12") or _has_dist("mlx-cuda-13") or _has_dist("mlx-cuda"):
        _INFO = "mlx cuda build (cpu blas unchanged)"
    elif "mlx.core" in sys.modules:
        warnings.warn(
            "mlx.core was imported before exo_medusa_mlx.setup_blas(); MLX keeps its slow reference BLAS. "
            "Call exo_medusa_mlx.setup_blas() before the first 'import mlx'.",
            RuntimeWarning,
            stacklevel=2,
        )
        _INFO = "reference (mlx.core imported before setup_blas)"
    else:
        _torch_first()
        _INFO = _load_openblas()
    return _INFO


def _torch_first() -> None:
    """Import torch (when installed) before OpenBLAS goes global.

    libtorch_cpu exports ``sgemm_`` and calls it through its PLT: with OpenBLAS
    loaded first with RTLD_GLOBAL, torch's own GEMMs would bind to OpenBLAS and
    fight torch's threads (transformers' generate measured 10x slower). Loaded
    first, torch keeps its BLAS, and MLX still binds ``cblas_sgemm`` to OpenBLAS.
    Costs torch's import time; ``EXO_MEDUSA_TORCH_FIRST=0`` skips it.
    """
    if "torch" in sys.modules or os.environ.get("EXO_MEDUSA_TORCH_FIRST", "1") == "0":
        return
    if importlib.util.find_spec("torch") is not None:
        import torch  # noqa: F401


def blas_info() -> str:
    """Short description of the BLAS MLX uses, e.g. ``openblas 0.3.31 (cmeel, patched, Haswell, 2 threads)``."""
    return setup_blas()


def set_blas_threads(n: int) -> int | None:
    """Set the threads of MLX's OpenBLAS GEMMs; return the previous count (None without OpenBLAS).

    Self-distillation runs two MLX streams, one GEMM thread each, on a 2-core CPU.
    """
    if not _HANDLES:
        return None
    lib = _HANDLES[0]
    try:
        prev = int(lib.scipy_openblas_get_num_threads())
        lib.scipy_openblas_set_num_threads(int(n))
    except AttributeError:
        return None
    return prev
