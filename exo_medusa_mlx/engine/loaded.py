"""One shard of a model loaded on a backend: the few array hooks the pass runner calls.

A backend (``mlx_backend.py``, ``torch_backend.py``) subclasses ``LoadedShard``;
the runner (``runner.py``) calls its hooks, all on one thread:

- ``new_cache(max_kv_size, keep)``: a ``(ctx, caches)`` pair for the shard's layers;
- ``device_array(x)``: a numpy input (ids, or hidden states) on the device;
- ``layers(h, sess, transposed, check)``: the shard's layers over ``h`` (1, T, H) as
  ``sess.ctx`` placed it, calling ``layer_done(h, check)`` after each layer;
- ``running()``: the context a pass runs in (torch: inference mode).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import numpy as np

from .sessions import Session
from .shard import Shard


class LoadedShard:
    """A shard's model (its layers; on the last shard the norm, lm_head, heads and tree) and tokenizer."""

    def __init__(self, shard: Shard, tokenizer: Any, model: Any):
        self.shard, self.tokenizer = shard, tokenizer
        self.model = model  # the backend's MedusaModel (only the shard's weights are real)

    def new_cache(self, max_kv_size: int | None, keep: int):
        raise NotImplementedError

    def device_array(self, x: np.ndarray):
        raise NotImplementedError

    def layers(self, h, sess: Session, transposed: bool, check: Callable[[], None] | None):
        raise NotImplementedError

    def layer_done(self, h, check: Callable[[], None] | None) -> None:
        """After each of a pass's layers: stop there if the pass was cancelled (``check`` raises)."""
        if check is not None:
            check()

    def running(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()
