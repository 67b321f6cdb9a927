"""The exo 0.0.x inference engine contract, as an abstract class (names and shapes only).

Every method is async; a node holds one engine and calls it for the layers of its
shard. The first shard takes token ids (1, T), middle shards hidden states
(1, T, H), the last shard returns logits (1, T, V). ``inference_state`` is a dict
of numpy arrays and JSON-able scalars that travels with the tensor round the ring.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from .shard import Shard

InferenceState = dict[str, Any]


class InferenceEngine(ABC):
    """What exo's node calls. Subclasses set ``shard``, ``tokenizer`` and keep ``shard_downloader``."""

    shard: Shard | None = None
    tokenizer: Any = None  # with eos_token_id, encode, decode
    shard_downloader: Any = None
    session: dict[str, Any]

    @abstractmethod
    async def encode(self, shard: Shard, prompt: str) -> np.ndarray:
        """Token ids of ``prompt``, (T,)."""

    @abstractmethod
    async def sample(self, x: np.ndarray, temp: float = 0.0, top_p: float = 1.0) -> np.ndarray:
        """A token from the last position of logits ``x`` (1, T, V); returns shape (1,)."""

    @abstractmethod
    async def decode(self, shard: Shard, tokens: np.ndarray) -> str:
        """Text of ``tokens``."""

    @abstractmethod
    async def infer_tensor(self, request_id: str, shard: Shard, input_data: np.ndarray,
                           inference_state: InferenceState | None = None
                           ) -> tuple[np.ndarray, InferenceState | None]:
        """Run this shard's layers on ``input_data``; returns the output and the state to pass on."""

    @abstractmethod
    async def load_checkpoint(self, shard: Shard, path: str | Path) -> None:
        """Load weights for ``shard`` from ``path``."""

    @abstractmethod
    async def save_checkpoint(self, shard: Shard, path: str | Path) -> None:
        """Write the weights of ``shard`` to ``path``."""

    @abstractmethod
    async def ensure_shard(self, shard: Shard) -> None:
        """Make ``shard`` the loaded one (download through ``shard_downloader`` if needed)."""

    async def infer_prompt(self, request_id: str, shard: Shard, prompt: str,
                           inference_state: InferenceState | None = None
                           ) -> tuple[np.ndarray, InferenceState | None]:
        tokens = await self.encode(shard, prompt)
        return await self.infer_tensor(request_id, shard, np.asarray(tokens).reshape(1, -1), inference_state)

    async def train(self, request_id: str, shard: Shard, inputs, targets, lengths, *args, **kwargs):
        """exo's training step (``exo train``): not offered; the base model stays frozen."""
        raise NotImplementedError(f"{type(self).__name__} does not train in exo; train Medusa heads with "
                                  "`mlx_medusa train`")

    async def evaluate(self, request_id: str, shard: Shard, inputs, targets, lengths, *args, **kwargs):
        """exo's evaluation step (``exo eval``): not offered."""
        raise NotImplementedError(f"{type(self).__name__} does not evaluate in exo; `mlx_medusa train` reports "
                                  "the heads' validation accuracy")

    async def save_session(self, key: str, value: Any) -> None:
        if not hasattr(self, "session"):
            self.session = {}
        self.session[key] = value

    async def clear_session(self) -> None:
        self.session = {}
