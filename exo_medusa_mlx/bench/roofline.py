"""The roofline of a decoding step: how much of this CPU's matmul peak a step's forward uses.

The peak is measured in the same run, as ``scripts/bench_blas.py`` measures BLAS: a float32
GEMM of the model's hidden size through the backend's own matmul (MLX's BLAS, or torch's).
A step's FLOPs are counted from the model's shapes: every row (a token verified) goes through
each layer's projections and MLP and attends to the cached context; then the lm_head. The
Medusa heads' own work is left out (a few residual blocks beside the lm_head), so the fraction
is a lower bound for Medusa steps.
"""

from __future__ import annotations

import time

import numpy as np

PEAK_REPEATS = 5


def best_seconds(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(backend: str, n: int, repeats: int = PEAK_REPEATS) -> float:
    """FLOP/s of an ``n`` x ``n`` float32 GEMM through ``backend``'s matmul ("mlx" or "torch"), best of ``repeats``."""
    a = np.random.default_rng(0).standard_normal((2, n, n), dtype=np.float32)
    if backend == "mlx":
        import mlx.core as mx

        x, y = mx.array(a[0]), mx.array(a[1])
        seconds = best_seconds(lambda: mx.eval(x @ y), repeats)
    elif backend == "torch":
        import torch

        x, y = torch.from_numpy(a[0]), torch.from_numpy(a[1])
        with torch.inference_mode():
            seconds = best_seconds(lambda: x @ y, repeats)
    else:
        raise ValueError(f"backend '{backend}' is not mlx or torch")
    return 2.0 * n**3 / seconds


def _get(config, name: str, default=None):
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def step_flops(config, rows: float, context: float) -> float:
    """Forward FLOPs of ``rows`` new tokens over ``context`` cached ones (a batch: the mean per row),
    from a model config (mlx-lm's args, transformers' config or a dict)."""
    H, I, L = _get(config, "hidden_size"), _get(config, "intermediate_size"), _get(config, "num_hidden_layers")
    heads = _get(config, "num_attention_heads")
    kv = _get(config, "num_key_value_heads") or heads
    d = _get(config, "head_dim") or H // heads
    V = _get(config, "vocab_size")
    linear = H * heads * d + 2 * H * kv * d + heads * d * H + 3 * H * I  # q, k, v, o; gate, up, down
    attention = 2 * heads * d * context  # scores and the weighted sum, per row and layer
    return 2.0 * rows * (L * (linear + attention) + H * V)


def roofline(steps: int, rows: int, seconds: float, config, context: float, peak: float) -> dict:
    """Per step: rows verified, time, and the fraction of ``peak`` FLOP/s its forward reached."""
    if steps <= 0 or seconds <= 0:
        return {"rows_per_step": 0.0, "step_ms": 0.0, "gflops": 0.0, "peak_fraction": 0.0}
    per_row = rows / steps
    flops = step_flops(config, per_row, context)
    step = seconds / steps
    return {"rows_per_step": per_row, "step_ms": step * 1e3, "gflops": flops / step / 1e9,
            "peak_fraction": flops / step / peak}
