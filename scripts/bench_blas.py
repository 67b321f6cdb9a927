"""Compare MLX and numpy float32 matmul throughput (checks that MLX got a fast BLAS).

Usage: python scripts/bench_blas.py [--sizes 1024 2048] [--min-ratio 0.5]
Exits 1 when MLX reaches less than ``--min-ratio`` times numpy's GFLOP/s.
"""

from __future__ import annotations

import argparse
import sys
import time

import exo_medusa_mlx
from exo_medusa_mlx._blas import blas_info

exo_medusa_mlx.setup_blas()  # before the first import of mlx

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(n: int, repeats: int) -> tuple[float, float]:
    """GFLOP/s of an ``n x n`` float32 matmul for (mlx, numpy)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    am, bm = mx.array(a), mx.array(b)
    mx.eval(am, bm)
    flops = 2.0 * n**3 / 1e9
    t_mx = _best_seconds(lambda: mx.eval(am @ bm), repeats)
    t_np = _best_seconds(lambda: a @ b, repeats)
    diff = float(np.abs(np.array(am @ bm) - a @ b).max())
    if diff > 1e-2 * n**0.5:
        raise ValueError(f"mlx and numpy matmul disagree at n={n} (max abs diff {diff:.3g})")
    return flops / t_mx, flops / t_np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-ratio", type=float, default=0.5)
    args = p.parse_args()

    print(f"blas: {blas_info()}  mlx {mx.__version__}  numpy {np.__version__}")
    print(f"{'n':>6} {'mlx GFLOP/s':>12} {'numpy GFLOP/s':>14} {'ratio':>6}")
    worst = float("inf")
    for n in args.sizes:
        g_mx, g_np = bench(n, args.repeats)
        worst = min(worst, g_mx / g_np)
        print(f"{n:>6} {g_mx:>12.1f} {g_np:>14.1f} {g_mx / g_np:>6.2f}")
    if worst < args.min_ratio:
        print(f"FAIL: mlx is {worst:.2f}x numpy (< {args.min_ratio}); blas: {blas_info()}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
