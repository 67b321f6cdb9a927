"""exo inference engines with Medusa speculative decoding across a layer-split ring.

``Shard`` and ``InferenceEngine`` mirror exo 0.0.x's contract;
``MedusaMLXInferenceEngine`` runs one shard on MLX; ``MedusaTorchInferenceEngine``
(imported on first use) on PyTorch. ``state`` holds the ring protocol,
``ring.run_ring`` an in-process ring, ``registry.register_with_exo`` the exo hookup.
"""

from .downloader import LocalShardDownloader
from .engine import InferenceEngine
from .mlx_engine import MedusaMLXInferenceEngine
from .ring import run_ring, run_ring_async
from .shard import Shard

# MedusaTorchInferenceEngine is exported lazily (below) and kept out of __all__, so a
# star import never pulls in torch.
__all__ = [
    "InferenceEngine",
    "LocalShardDownloader",
    "MedusaMLXInferenceEngine",
    "Shard",
    "run_ring",
    "run_ring_async",
]


def __getattr__(name: str):
    if name == "MedusaTorchInferenceEngine":
        try:
            from .torch_engine import MedusaTorchInferenceEngine
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.torch_engine":
                raise  # torch itself, or one of its dependencies, is missing: say so as is
            raise ImportError(
                "MedusaTorchInferenceEngine is not available yet: exo_medusa_mlx/exo/torch_engine.py lands with "
                "the torch path (exo_medusa_mlx.torch_compat); use MedusaMLXInferenceEngine meanwhile"
            ) from None
        return MedusaTorchInferenceEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
