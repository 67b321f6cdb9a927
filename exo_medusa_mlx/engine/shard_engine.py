"""exo's engine contract over the shard runner: shards, sessions, the worker thread, cancellation.

``MedusaShardEngine`` is the thin async side: it loads the shard a node asks for
(through the shard downloader, with its Medusa heads on the last shard), keeps the
requests' sessions (least recently used goes first), and runs every pass on its one
worker thread through ``ShardRunner`` (``runner.py``), which holds the pass logic.
A backend subclass gives ``_load_backend(shard, path, heads, tree) -> LoadedShard``.

A pass is cancellable: when the caller stops awaiting ``infer_tensor`` (a gRPC
deadline, a cancelled task) or ``cancel_all`` runs, the worker stops at the next
prefill chunk or layer with ``Cancelled``.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import numpy as np

from ..core.accept import target_probs
from ..core.limits import UNKNOWN_CONTEXT, Limits, check_prompt_text
from ..core.model_files import check_model_folder, config_context
from ..core.slots import DEFAULT_KEEP, SlotMap
from ..core.tokens import encode_prompt
from . import protocol as st
from .contract import InferenceEngine, InferenceState
from .downloader import LocalShardDownloader
from .heads_source import shard_heads
from .loaded import LoadedShard
from .runner import Check, ShardRunner
from .sessions import Sessions
from .shard import Shard, as_shard
from .worker import PassWorker

DEFAULT_MAX_SESSIONS = 4  # requests whose caches are kept (least recently used goes first)


class MedusaShardEngine(InferenceEngine):
    """An exo engine that runs one shard of a model with Medusa across the ring.

    Args:
        shard_downloader: exo's, or ``LocalShardDownloader()`` (the default).
        medusa: propose Medusa trees when heads are found (a request may override).
        heads: Medusa heads folder for every model (else the downloader's, else the model folder's).
        tree: tree spec for the heads (else the downloader's, else the heads' tuned tree).
        max_kv_size: bounded rotating cache per request (None: unbounded).
        max_sessions: requests whose caches are kept; the least recently used is freed first.
    """

    _worker_exit = None  # run on the worker thread as it ends (MLX: free the thread's streams)

    def __init__(self, shard_downloader=None, *, medusa: bool = True, heads: str | Path | None = None,
                 tree=None, max_kv_size: int | None = None, keep: int = DEFAULT_KEEP,
                 max_sessions: int = DEFAULT_MAX_SESSIONS, dtype=None):
        SlotMap(max_kv_size, keep)  # a window too small for the sink tokens fails here, not at every request
        self._sessions = Sessions(max_sessions)
        self.shard_downloader = shard_downloader if shard_downloader is not None else LocalShardDownloader()
        self.shard: Shard | None = None
        self.tokenizer = None
        self.session: dict[str, Any] = {}
        self.medusa, self.heads, self.tree = medusa, heads, tree
        self.max_kv_size, self.keep, self.dtype = max_kv_size, keep, dtype
        self.runner: ShardRunner | None = None  # the loaded shard's (``_load``)
        self._rng = np.random.default_rng()
        # All array work on one thread, as exo's MLX engine does; shut down with the engine or at exit.
        self._worker = PassWorker(type(self).__name__, self._worker_exit)
        weakref.finalize(self, self._worker.shutdown)

    def close(self, timeout: float | None = None) -> bool:
        """Cancel every pass and stop the worker thread; the engine is unusable after.

        Returns False if the worker was still busy after ``timeout`` seconds (None: wait).
        """
        self.cancel_all("the engine is closing")
        return self._worker.shutdown(timeout)

    def cancel_all(self, reason: str = "the node is stopping") -> None:
        """Every queued or running pass stops at its next prefill chunk or layer (any thread)."""
        self._worker.cancel_all(reason)

    async def _run(self, fn, *args):
        """``fn(*args)`` on the engine's worker thread."""
        return await self._worker.run(fn, *args)

    @property
    def limits(self) -> Limits:
        """The loaded model's limits for one request on this engine."""
        return self.runner.limits if self.runner is not None else Limits(UNKNOWN_CONTEXT, self.max_kv_size)

    @property
    def engine_name(self) -> str:
        """The name exo's downloaders look model cards up by: the class name."""
        return type(self).__name__

    @property
    def model(self):
        return self.runner.model

    # ----------------------------------------------------------------- shards and sessions

    async def ensure_shard(self, shard: Shard) -> None:
        shard = as_shard(shard)
        if self.shard == shard:
            return
        path = Path(await self.shard_downloader.ensure_shard(shard, self.engine_name))
        heads, tree = await shard_heads(self, shard, path)
        await self._run(self._load, shard, path, heads, tree)

    def _load(self, shard: Shard, path: Path, heads, tree) -> None:
        if self.shard == shard:
            return
        self._sessions.clear()
        self.runner, self.shard = None, None
        config = check_model_folder(path)  # a config that is not an object, a truncated weights file: one line
        loaded = self._load_backend(shard, path, heads if shard.is_last_layer() else None, tree)
        # mlx-lm's args for some models do not carry the context: the config does, else a cap.
        context = loaded.model.max_context or config_context(config) or UNKNOWN_CONTEXT
        self.runner = ShardRunner(loaded, context, medusa=self.medusa, max_kv_size=self.max_kv_size, keep=self.keep)
        self.tokenizer = loaded.tokenizer
        self.shard = shard

    def _load_backend(self, shard: Shard, path: Path, heads, tree) -> LoadedShard:
        """The backend's model for ``shard`` (heads and tree on the last shard only)."""
        raise NotImplementedError

    async def finish_request(self, request_id: str) -> bool:
        """Free a finished request's caches; True if it had any."""
        return await self._run(lambda: self._sessions.pop(request_id) is not None)

    async def clear_session(self) -> None:
        self.session = {}
        await self._run(self._sessions.clear)

    @property
    def request_ids(self) -> list[str]:
        """Requests holding caches, least recently used first."""
        return list(self._sessions)

    # ----------------------------------------------------------------- tokens

    async def encode(self, shard: Shard, prompt: str) -> np.ndarray:
        await self.ensure_shard(shard)
        check_prompt_text(self.tokenizer, prompt, self.limits.context)  # before minutes of tokenizing
        return await self._run(encode_prompt, self.tokenizer, prompt)

    async def decode(self, shard: Shard, tokens: np.ndarray) -> str:
        await self.ensure_shard(shard)
        return await self._run(self.tokenizer.decode, np.asarray(tokens).reshape(-1).tolist())

    async def sample(self, x: np.ndarray, temp: float = 0.0, top_p: float = 1.0) -> np.ndarray:
        """A token from the last position of logits (1, T, V), shape (1,)."""
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[0] != 1:
            raise ValueError(f"sample takes logits of shape (1, T, V), got {st._describe(x)}")
        row = x[0, -1].astype(np.float32)
        if temp == 0:
            return np.array([int(np.argmax(row))])
        p = target_probs(row, temp, top_p)
        return np.array([int(self._rng.choice(p.shape[-1], p=p))])

    # ----------------------------------------------------------------- a pass

    async def infer_tensor(self, request_id: str, shard: Shard, input_data: np.ndarray,
                           inference_state: InferenceState | None = None
                           ) -> tuple[np.ndarray, InferenceState | None]:
        shard = as_shard(shard)
        await self.ensure_shard(shard)
        return await self._worker.run_pass(self._infer, request_id, shard, input_data, inference_state)

    def _infer(self, request_id: str, shard: Shard, x, state, check: Check):
        """On the worker: the pass through the runner. A refused pass changes nothing; one that
        fails after its checks leaves the request's cache unknown, so the request is dropped."""
        check()  # cancelled while it waited for the worker
        if shard != self.shard:  # another call switched the engine's shard meanwhile
            raise ValueError(f"this engine now holds {self.shard}, not {shard}; one engine serves one shard at a time")
        p = self.runner.check(request_id, self._sessions.get(request_id), x, state)
        if p.new:
            self._sessions.add(request_id, p.session)
        try:
            return self.runner.run(p, check)
        except Exception:
            self._sessions.pop(request_id)
            raise
