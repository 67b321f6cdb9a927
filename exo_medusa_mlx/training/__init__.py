"""Head training (``mlx_medusa train``): data, hidden-state files, loss, checkpoints, prompts.

Most modules here import MLX, so the package sets up MLX's BLAS first (``setup_blas``: a
no-op where it was done, or where MLX is absent): ``python -m exo_medusa_mlx.training.train``,
which scripts/train_default_heads.sh runs, then computes as fast as ``mlx_medusa train``.
"""

from .._blas import setup_blas

setup_blas()
