"""Give MLX an optimized BLAS on Linux.

``mlx[cpu]`` on Linux links a reference BLAS (``mlx_cpu.libs/libblas``), which
is ~50x slower than OpenBLAS for a float32 GEMM. ``cmeel-openblas`` ships an
OpenBLAS exporting the same ``cblas_sgemm``/``sgemm_`` symbols, but it needs a
``libgfortran.so.5`` that is usually not installed. We copy it into a cache
folder, point its ``libgfortran`` dependency at the copy bundled with MLX
(``patchelf``), and ``dlopen`` it with ``RTLD_GLOBAL`` *before* ``mlx.core``
is imported, so the dynamic linker binds MLX's BLAS calls to OpenBLAS.

This module must not import mlx. Set ``EXO_MEDUSA_BLAS=off`` to disable.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from importlib import metadata
from pathlib import Path

__all__ = ["preload_blas", "blas_info", "cache_root"]

_INFO: str | None = None
_HANDLE: ctypes.CDLL | None = None  # keep the library loaded for the process lifetime


def cache_root() -> Path:
    """``$EXO_MEDUSA_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/exo_medusa_mlx``."""
    env = os.environ.get("EXO_MEDUSA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "exo_medusa_mlx"


def _dist_file(dist: str, pattern: str) -> Path | None:
    """First file matching ``pattern`` (relative to site-packages) of an installed distribution."""
    try:
        root = Path(metadata.distribution(dist).locate_file(""))
    except metadata.PackageNotFoundError:
        return None
    return next(iter(sorted(root.glob(pattern))), None)


def _has_dist(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def _patchelf() -> str | None:
    local = Path(sysconfig.get_path("scripts")) / "patchelf"
    if local.is_file():
        return str(local)
    return shutil.which("patchelf")


def _cache_key(*files: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _patched_copy(openblas: Path, gfortran: Path, patchelf: str) -> Path:
    """Return a cached copy of ``openblas`` whose libgfortran NEEDED entry is ``gfortran``."""
    out_dir = cache_root() / "blas" / _cache_key(openblas, gfortran)
    final = out_dir / openblas.name
    if final.is_file():
        return final
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{openblas.name}.{os.getpid()}.tmp"
    try:
        shutil.copyfile(openblas, tmp)
        subprocess.run(
            [patchelf, "--replace-needed", "libgfortran.so.5", str(gfortran.resolve()), str(tmp)],
            check=True,
            capture_output=True,
        )
        os.chmod(tmp, 0o755)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _describe(lib: ctypes.CDLL, source: str) -> str:
    version = "?"
    try:
        version = metadata.version("cmeel-openblas")
    except metadata.PackageNotFoundError:
        pass
    extra = [source]
    try:
        lib.openblas_get_corename.restype = ctypes.c_char_p
        extra.append(lib.openblas_get_corename().decode())
        lib.openblas_get_num_threads.restype = ctypes.c_int
        extra.append(f"{lib.openblas_get_num_threads()} threads")
    except AttributeError:
        pass
    return f"openblas {version} ({', '.join(extra)})"


def _load_openblas() -> str:
    """Load OpenBLAS globally; return its description or a 'reference (...)' reason."""
    global _HANDLE
    openblas = _dist_file("cmeel-openblas", "cmeel.prefix/lib/libopenblas.so.0")
    if openblas is None:
        return "reference (cmeel-openblas not installed)"
    gfortran = _dist_file("mlx-cpu", "mlx_cpu.libs/libgfortran*.so.5*")
    patchelf = _patchelf()
    target, source = openblas, "cmeel"
    if gfortran is not None and patchelf is not None:
        try:
            target, source = _patched_copy(openblas, gfortran, patchelf), "cmeel, patched"
        except (OSError, subprocess.CalledProcessError):
            pass  # fall through: works only if the system has libgfortran.so.5
    try:
        _HANDLE = ctypes.CDLL(str(target), mode=ctypes.RTLD_GLOBAL)
    except OSError:
        missing = "patchelf" if patchelf is None else "libgfortran.so.5"
        return f"reference (openblas not loadable: {missing} missing)"
    return _describe(_HANDLE, source)


def preload_blas() -> str:
    """Load OpenBLAS for MLX (Linux CPU build only, before ``mlx.core``); return the BLAS description.

    Idempotent. Falls back to MLX's reference BLAS when anything is missing; the
    description then says ``reference (<why>)``.
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
    elif _has_dist("mlx-cuda-12") or _has_dist("mlx-cuda-13") or _has_dist("mlx-cuda"):
        _INFO = "mlx cuda build (cpu blas unchanged)"
    elif "mlx.core" in sys.modules:
        warnings.warn(
            "mlx.core was imported before exo_medusa_mlx; MLX keeps its slow reference BLAS. "
            "Import exo_medusa_mlx first.",
            RuntimeWarning,
            stacklevel=2,
        )
        _INFO = "reference (mlx.core imported before preload)"
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
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        import torch  # noqa: F401


def blas_info() -> str:
    """Short description of the BLAS MLX uses, e.g. ``openblas 0.3.31 (cmeel, patched, Haswell, 2 threads)``."""
    return preload_blas()
