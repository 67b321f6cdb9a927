"""exo inference engines with Medusa speculative decoding across a layer-split ring.

``Shard`` and ``InferenceEngine`` mirror exo 0.0.x's contract;
``MedusaMLXInferenceEngine`` runs one shard on MLX; ``MedusaTorchInferenceEngine``
(imported on first use) on PyTorch (both from ``engine/``, whose ``protocol`` holds the ring
protocol); ``run_ring`` an in-process ring, ``registry.register_with_exo`` the exo hookup,
``install()`` the hookup with Medusa (``mlx_medusa exo`` runs exo's node after it).
"""

from ..engine.downloader import LocalShardDownloader
from ..engine.contract import InferenceEngine
from .install import install
from ..engine.ring_loop import run_ring, run_ring_async
from ..engine.shard import Shard

# The engines load on first use: an NVIDIA node needs no MLX, a Mac no torch.
__all__ = [
    "InferenceEngine",
    "LocalShardDownloader",
    "MedusaMLXInferenceEngine",
    "MedusaTorchInferenceEngine",
    "Shard",
    "install",
    "run_ring",
    "run_ring_async",
]


def __getattr__(name: str):
    if name == "MedusaMLXInferenceEngine":
        from .._blas import setup_blas

        setup_blas()  # before the engine imports mlx
        from ..engine.mlx_backend import MedusaMLXInferenceEngine

        return MedusaMLXInferenceEngine
    if name == "MedusaTorchInferenceEngine":
        from ..engine.torch_backend import MedusaTorchInferenceEngine

        return MedusaTorchInferenceEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
