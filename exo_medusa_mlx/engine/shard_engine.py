"""The backend-neutral Medusa shard engine: exo's engine contract, the ring logic, and the last shard's step.

Each shard runs its layers over a per-request cache; the last shard verifies,
accepts and proposes with the one Medusa step (``core/step.py``); what travels
between shards is ``state.py``'s protocol. A backend subclass supplies a short
list of hooks, all called on the engine's one worker thread:

- ``_load_backend(shard, path, heads, tree) -> Loaded``: the shard's model (its
  layers; on the last shard the norm, lm_head, heads and tree) and tokenizer;
- ``_new_cache()``: a ``(ctx, caches)`` pair for the shard's layers;
- ``_device_array(x)``: a numpy input (ids, or hidden states) on the device;
- ``_layers(h, sess, transposed)``: the shard's layers over ``h`` (1, T, H) as
  ``sess.ctx`` placed it, calling ``self._layer_done(h)`` after each layer.

Every pass is checked against the model's ``Limits`` (``state.check_input`` /
``check_pass``) before the cache is touched, and is cancellable: when the caller
stops awaiting ``infer_tensor`` (a gRPC deadline, a cancelled task) or ``cancel_all``
runs, the worker stops at the next prefill chunk or layer with ``Cancelled``.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..core.accept import make_policy, target_probs
from ..core.generation import encode_prompt
from ..core.limits import UNKNOWN_CONTEXT, CancelToken, Limits, check_prompt_text
from ..core.model_files import check_model_folder, config_context
from ..core.slots import DEFAULT_KEEP, SlotMap, run_committed
from ..core.step import ROOT_ONLY, advance, read
from . import protocol as st
from .downloader import LocalShardDownloader
from .contract import InferenceEngine, InferenceState
from .heads_source import shard_heads
from .sessions import Session, Sessions
from .shard import Shard, as_shard
from .worker import WorkerThread

DEFAULT_MAX_SESSIONS = 4  # requests whose caches are kept (least recently used goes first)


@dataclass
class Loaded:
    """What a backend loaded for one shard."""

    shard: Shard
    tokenizer: Any
    model: Any  # the backend's MedusaModel (only the shard's weights are real)


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
        self._loaded: Loaded | None = None
        self._rng = np.random.default_rng()
        self._passes: set[CancelToken] = set()  # passes queued or running
        self._check = None  # the running pass's CancelToken.check (worker thread only)
        self._context = UNKNOWN_CONTEXT  # the loaded model's (``_load``)
        # All array work on one thread, as exo's MLX engine does; shut down with the engine or at exit.
        self._executor = WorkerThread(type(self).__name__, self._worker_exit)
        weakref.finalize(self, self._executor.shutdown)

    def close(self, timeout: float | None = None) -> bool:
        """Cancel every pass and stop the worker thread; the engine is unusable after.

        Returns False if the worker was still busy after ``timeout`` seconds (None: wait).
        """
        self.cancel_all("the engine is closing")
        return self._executor.shutdown(timeout=timeout)

    def cancel_all(self, reason: str = "the node is stopping") -> None:
        """Every queued or running pass stops at its next prefill chunk or layer (any thread)."""
        for token in list(self._passes):
            token.cancel(reason)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    async def _run_pass(self, fn, *args):
        """``fn(*args, token)`` on the worker; if the caller stops awaiting, the pass is cancelled."""
        token = CancelToken()
        self._passes.add(token)
        try:
            return await self._run(fn, *args, token)
        except asyncio.CancelledError:
            token.cancel("the caller gave up on the pass (deadline or cancellation)")
            raise
        finally:
            self._passes.discard(token)

    @property
    def limits(self) -> Limits:
        """The loaded model's limits for one request on this engine."""
        return Limits(self._context, self.max_kv_size)

    def _layer_done(self, h) -> None:
        """After each of a pass's layers: stop there if the pass was cancelled."""
        if self._check is not None:
            self._check()

    @property
    def engine_name(self) -> str:
        """The name exo's downloaders look model cards up by: the class name."""
        return type(self).__name__

    @property
    def model(self):
        return self._loaded.model

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
        self._loaded, self.shard = None, None
        config = check_model_folder(path)  # a config that is not an object, a truncated weights file: one line
        self._loaded = self._load_backend(shard, path, heads if shard.is_last_layer() else None, tree)
        # mlx-lm's args for some models do not carry the context: the config does, else a cap.
        self._context = self._loaded.model.max_context or config_context(config) or UNKNOWN_CONTEXT
        self.tokenizer = self._loaded.tokenizer
        self.shard = shard

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
        return await self._run_pass(self._infer, request_id, shard, input_data, inference_state)

    def _infer(self, request_id: str, shard: Shard, x, state, token: CancelToken | None = None):
        if token is not None:
            token.check()  # cancelled while it waited for the worker
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if shard != self.shard:  # another call switched the engine's shard meanwhile
            raise ValueError(f"this engine now holds {self.shard}, not {shard}; one engine serves one shard at a time")
        limits = self.limits
        x = st.check_input(shard, x, self.model.hidden_size, self.model.vocab_size, limits)
        req = st.parse_request(state, x.shape[1], limits.max_tree)
        tokens = x[0] if shard.is_first_layer() else req.tokens
        if shard.is_first_layer() and req.tokens is not None and not np.array_equal(req.tokens, tokens):
            raise ValueError(f"inference_state['{st.TOKENS}'] differs from the input token ids")
        sess = self._sessions.get(request_id)
        st.check_pass(request_id, req, shard, sess is not None, sess.ctx.committed if sess else 0,
                      sess.pending if sess else None, x.shape[1], limits)
        self._check = None if token is None else token.check
        try:
            return self._run_checked(request_id, shard, x, state, req, tokens, sess)
        finally:
            self._check = None

    def _run_checked(self, request_id: str, shard: Shard, x, state, req: st.StepRequest, tokens,
                     sess: Session | None):
        """The pass, once every check passed: the caches change from here on."""
        if shard.is_last_layer():
            self._check_last(request_id, req, tokens, sess)
        if sess is None:
            ctx, caches = self._new_cache()
            sess = self._sessions.add(request_id, Session(ctx, caches, req.settings))
        try:
            if req.commit is not None:
                sess.ctx.commit(sess.caches, req.commit)
                sess.pending = None
            committed = sess.ctx.committed
            h = self._forward(sess, x, req)
            if req.is_tree:
                sess.pending = (req.depths, req.tree_mask)
            stock = not st.speaks_protocol(state)  # stock exo's node: what exo's own engines return, no state
            if shard.is_last_layer():
                if stock:
                    return self.model.to_numpy(self.model.logits(h))[0].astype(np.float32)[None], None
                return self._step(sess, h, req, tokens, committed, state)
            out_state = None if stock else state
            if req.is_tree and req.tokens is None:
                out_state = {**state, st.TOKENS: tokens}
            return self.model.to_numpy(h)[0][None], out_state
        except Exception:
            # A failure after the caches were touched leaves them unknown: drop this request only.
            self._sessions.pop(request_id)
            raise

    def _check_last(self, request_id: str, req: st.StepRequest, tokens, sess: Session | None) -> None:
        if sess is None or sess.policy is None:
            s = req.settings
            make_policy(s.temp, s.top_p, s.acceptance, s.seed)  # raises on a bad combination
        # A tree pass is the one this shard laid out last (a dynamic plan's changes every pass).
        st.check_tree_pass(request_id, req, tokens, sess.proposed if sess is not None else None)

    def _forward(self, sess: Session, x: np.ndarray, req: st.StepRequest):
        """This shard's layers over the pass, (T, H) (normed on the last shard). A tree pass stays
        in scratch until the next pass commits it; a plain run is committed at once, in chunks."""
        h = self._device_array(x)
        if self.shard.is_first_layer():
            h = self.model.embed(h)  # (1, T, H)
        ctx, T = sess.ctx, h.shape[1]
        if req.is_tree:
            ctx.begin(req.depths, req.tree_mask)
            out = self._layers(h, sess, self.model.transposes(T))[0]
        else:
            outs = run_committed(ctx, sess.caches, T, lambda s, e: self._layers(h[:, s:e], sess, False)[0],
                                 lambda o: self.model.settle(sess.caches), check=self._check)
            out = outs[0] if len(outs) == 1 else self.model.ops.concat(outs)
        return self.model.base.model.norm(out) if self.shard.is_last_layer() else out

    def _step(self, sess: Session, h, req: st.StepRequest, tokens, committed: int, state):
        """The last shard: accept from this pass, emit, and lay out the next pass (``core.step``).

        A plain run (the prompt, or one token) is committed already: its last
        position is verified as a root-only tree, as after ``generate_step``'s prefill.
        ``committed``: position of this pass's first token. Returns the pass's logits,
        (1, T, V), and the state for the next pass.
        """
        if sess.policy is None:
            s = sess.settings
            sess.policy = make_policy(s.temp, s.top_p, s.acceptance, s.seed)
            sess.tree = self.model.tree if (self.medusa if s.medusa is None else s.medusa) else ROOT_ONLY
        tree, policy = sess.tree, sess.policy
        rows = h if req.is_tree else h[-1:]
        v = read(self.model, rows, tree, logits=True)
        # exo's contract: the last shard returns the logits of every position of the pass; a
        # tree's or one token's are the verdict already (the vocabulary projection runs once).
        whole = req.is_tree or h.shape[0] == 1
        logits = v.verdict if whole else self.model.to_numpy(self.model.logits(h))[0]
        if not policy.needs_logits:
            v = replace(v, verdict=v.verdict.argmax(-1))
        acc, nxt = advance(policy, sess.proposed if req.is_tree else ROOT_ONLY,
                           tokens if req.is_tree else np.zeros(1, dtype=np.int64), v, tree)
        sess.passes += 1
        root_pos = committed + (len(acc.nodes) if req.is_tree else h.shape[0])
        tree, nxt = nxt.tree, nxt.tokens
        if tree.size > 1 and not self._fits(root_pos, tree):
            tree, nxt = ROOT_ONLY, np.array([acc.tokens[-1]], dtype=np.int64)  # the context's end: plainly
        sess.proposed = tree
        out = {k: v for k, v in (state or {}).items() if not k.startswith("medusa_")}
        out.update(st.settings_state(sess.settings))
        out[st.EMITTED] = np.asarray(acc.tokens, dtype=np.int64)
        if req.is_tree:
            out[st.NEXT + "commit"] = np.asarray(acc.nodes, dtype=np.int64)
        out[st.NEXT + "tokens"] = nxt
        out[st.NEXT + "positions"] = (root_pos + tree.depths).astype(np.int64)
        if tree.size > 1:
            out[st.NEXT + "depths"] = tree.depths.astype(np.int64)
            out[st.NEXT + "tree_mask"] = tree.mask.copy()
        return logits.astype(np.float32)[None], out

    def _fits(self, root_pos: int, tree) -> bool:
        """Whether a tree rooted at ``root_pos`` stays inside the context (always, with a window)."""
        return self.max_kv_size is not None or root_pos + tree.depth < self._context

    # ----------------------------------------------------------------- backend hooks

    def _load_backend(self, shard: Shard, path: Path, heads, tree) -> Loaded:
        raise NotImplementedError

    def _new_cache(self):
        raise NotImplementedError

    def _device_array(self, x: np.ndarray):
        raise NotImplementedError

    def _layers(self, h, sess: Session, transposed: bool):
        raise NotImplementedError
