"""One request's caches on a shard, and the few requests a shard keeps (least recently used goes first)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.accept import Policy
from ..core.dynamic import DynamicTree
from ..core.tree import TreeBuffers
from .protocol import Settings


@dataclass
class Session:
    """One request's caches on this shard, and (last shard) how it decodes."""

    ctx: Any
    caches: list
    settings: Settings = field(default_factory=Settings)
    pending: tuple[np.ndarray, np.ndarray] | None = None  # (depths, mask) of a tree forward not yet committed
    policy: Policy | None = None  # last shard: how the request picks tokens, chosen when it starts
    tree: TreeBuffers | DynamicTree | None = None  # last shard: its plan (root alone: plain decoding)
    proposed: TreeBuffers | None = None  # last shard: the tree of the pass it laid out last


class Sessions:
    """Request id -> ``Session``, at most ``limit`` of them; the least recently used is freed first."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"max_sessions {limit} must be at least 1")
        self.limit = limit
        self._items: OrderedDict[str, Session] = OrderedDict()

    def get(self, request_id: str) -> Session | None:
        sess = self._items.get(request_id)
        if sess is not None:
            self._items.move_to_end(request_id)
        return sess

    def add(self, request_id: str, sess: Session) -> Session:
        self._items[request_id] = sess
        while len(self._items) > self.limit:
            self._items.popitem(last=False)
        return sess

    def pop(self, request_id: str) -> Session | None:
        return self._items.pop(request_id, None)

    def clear(self) -> None:
        self._items.clear()

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
