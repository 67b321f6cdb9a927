import os
import sys

# Import the package first: it gives MLX an optimized BLAS before mlx loads.
import exo_medusa_mlx  # noqa: F401

sys.path.insert(0, os.path.dirname(__file__))
