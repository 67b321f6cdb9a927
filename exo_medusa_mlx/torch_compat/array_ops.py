"""The array primitives the neutral code (``core/base.py``) needs, on torch."""

from __future__ import annotations

import numpy as np
import torch


def topk_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest logits, best first. logits: (..., V) -> (..., k)."""
    return torch.topk(logits, k, dim=-1, sorted=True).indices


def top_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk_ids`` and the log-softmax of ``logits`` there: (..., V) -> (..., k), (..., k)."""
    z = logits.float()
    top = torch.topk(z, k, dim=-1, sorted=True)
    return top.indices, top.values - torch.logsumexp(z, dim=-1, keepdim=True)


def to_numpy(a: torch.Tensor) -> np.ndarray:
    a = a.detach()
    return (a.float() if a.dtype in (torch.bfloat16, torch.float16) else a).cpu().numpy()


class TorchOps:
    topk = staticmethod(topk_ids)
    top_logprobs = staticmethod(top_logprobs)

    @staticmethod
    def stack(xs: list, axis: int = 0) -> torch.Tensor:
        return torch.stack(xs, dim=axis)

    @staticmethod
    def concat(xs: list, axis: int = 0) -> torch.Tensor:
        return torch.cat(xs, dim=axis)

    @staticmethod
    def take(a: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
        return a.index_select(-1, torch.as_tensor(np.asarray(idx), dtype=torch.long, device=a.device))

    @staticmethod
    def argmax(a: torch.Tensor) -> torch.Tensor:
        return a.argmax(dim=-1)

    @staticmethod
    def scatter_vocab(sub: torch.Tensor, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
        rows = sub.new_full(sub.shape[:-1] + (vocab_size,), float("-inf"))
        return rows.index_copy(-1, ids, sub)

    @staticmethod
    def numpy(*arrays) -> tuple:
        return tuple(None if a is None else to_numpy(a) for a in arrays)
