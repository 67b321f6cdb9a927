"""Medusa decoding on PyTorch + transformers, the twin of the MLX path.

Same module names and signatures as ``exo_medusa_mlx``; the tree, slot map,
acceptors and checkpoint format are the shared numpy modules. Nothing here
imports mlx.
"""

from .generate import GenerationResponse, generate, stream_generate
from .loading import load

__all__ = ["load", "generate", "stream_generate", "GenerationResponse"]
