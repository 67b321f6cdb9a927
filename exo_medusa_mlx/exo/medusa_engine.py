"""The backend-neutral Medusa shard engine: sessions, the ring protocol, verify and propose.

A backend (MLX here, torch next) subclasses ``MedusaShardEngine`` and supplies
the array work, all called on the engine's one worker thread:

- ``_load_backend(shard, path, heads, tree) -> Loaded``: the shard's layers (and, on
  the last shard, the norm, lm_head, heads and tree), the tokenizer, sizes.
- ``_new_cache()``: a ``(ctx, caches)`` pair for the shard's layers (``ctx`` a
  ``SlotMap`` with ``begin``/``commit``, as in ``cache.py``).
- ``_forward(sess, x, req)``: this shard's layers on ``x`` (ids on the first shard,
  hidden states otherwise; normed on the last), committing a plain pass at once
  and leaving a tree pass in scratch. Returns backend hidden states (T, H).
- ``_commit(sess, nodes)``, ``_logits(h)`` (T, V), ``_propose(h, positions)`` (base
  logits (..., V), the heads' top-k guesses (D, ..., k); D: the tree's depth),
  ``_lay_out(guesses, root, tree)`` -> (T',) int64 tree tokens, ``_argmax(a)``,
  ``_numpy(a)``, ``_hidden_numpy(h)`` (1, T, H) for the wire.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..accept import Policy, make_policy, target_probs
from ..slots import DEFAULT_KEEP, PREFILL_STEP
from ..streaming import encode_prompt
from ..tree import TreeBuffers, build_tree
from . import state as st
from .downloader import LocalShardDownloader
from .engine import InferenceEngine, InferenceState
from .heads_source import shard_heads
from .shard import Shard, as_shard
from .worker import WorkerThread

DEFAULT_MAX_SESSIONS = 4  # requests whose caches are kept (least recently used goes first)
ROOT_ONLY = build_tree([])


@dataclass
class Loaded:
    """What a backend loaded for one shard."""

    shard: Shard
    tokenizer: Any
    hidden_size: int
    vocab_size: int
    tree: TreeBuffers  # the tree the last shard proposes (root alone without heads)
    has_heads: bool
    model: Any  # the backend's model object


@dataclass
class Session:
    """One request's caches on this shard, and (last shard) its sampling policy."""

    ctx: Any
    caches: list
    pending: tuple[np.ndarray, np.ndarray] | None = None  # (depths, mask) of a tree forward not yet committed
    policy: Policy | None = None
    use_heads: bool = False
    settings: st.Settings = field(default_factory=st.Settings)
    passes: int = 0  # passes verified (last shard)


def _describe(x) -> str:
    return f"{x.dtype} array of shape {tuple(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__


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
        if max_sessions < 1:
            raise ValueError(f"max_sessions {max_sessions} must be at least 1")
        self.shard_downloader = shard_downloader if shard_downloader is not None else LocalShardDownloader()
        self.shard: Shard | None = None
        self.tokenizer = None
        self.session: dict[str, Any] = {}
        self.medusa = medusa
        self.heads = heads
        self.tree = tree
        self.max_kv_size = max_kv_size
        self.keep = keep
        self.max_sessions = max_sessions
        self.dtype = dtype
        self._loaded: Loaded | None = None
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._rng = np.random.default_rng()
        # All array work on one thread, as exo's MLX engine does; shut down with the engine or at exit.
        self._executor = WorkerThread(type(self).__name__, self._worker_exit)
        weakref.finalize(self, self._executor.shutdown)

    def close(self) -> None:
        """Stop the worker thread (after the work queued so far); the engine is unusable after."""
        self._executor.shutdown()

    # ----------------------------------------------------------------- plumbing

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    @property
    def engine_name(self) -> str:
        """The name exo's downloaders look model cards up by: the class name."""
        return type(self).__name__

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
        self._loaded = None
        self.shard = None
        self._loaded = self._load_backend(shard, path, heads if shard.is_last_layer() else None, tree)
        self.tokenizer = self._loaded.tokenizer
        self.shard = shard

    async def finish_request(self, request_id: str) -> bool:
        """Free a finished request's caches; True if it had any."""
        return await self._run(lambda: self._sessions.pop(request_id, None) is not None)

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
        return await self._run(encode_prompt, self.tokenizer, prompt)

    async def decode(self, shard: Shard, tokens: np.ndarray) -> str:
        await self.ensure_shard(shard)
        return await self._run(self.tokenizer.decode, np.asarray(tokens).reshape(-1).tolist())

    async def sample(self, x: np.ndarray, temp: float = 0.0, top_p: float = 1.0) -> np.ndarray:
        """A token from the last position of logits (1, T, V), shape (1,)."""
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[0] != 1:
            raise ValueError(f"sample takes logits of shape (1, T, V), got {_describe(x)}")
        row = x[0, -1].astype(np.float32)
        if temp == 0:
            return np.array([int(np.argmax(row))])
        p = target_probs(row, temp, top_p)
        return np.array([int(self._rng.choice(p.shape[-1], p=p))])

    # ----------------------------------------------------------------- inference

    async def infer_tensor(self, request_id: str, shard: Shard, input_data: np.ndarray,
                           inference_state: InferenceState | None = None
                           ) -> tuple[np.ndarray, InferenceState | None]:
        shard = as_shard(shard)
        await self.ensure_shard(shard)
        return await self._run(self._infer, request_id, shard, input_data, inference_state)

    def _check_input(self, shard: Shard, x) -> np.ndarray:
        if not isinstance(x, np.ndarray) and hasattr(x, "__array__"):
            x = np.asarray(x)
        where = f"shard {shard.start_layer}-{shard.end_layer} of '{shard.model_id}'"
        L = self._loaded
        if shard.is_first_layer():
            ok = isinstance(x, np.ndarray) and x.dtype.kind in "iu" and x.ndim == 2 and x.shape[0] == 1
            if not ok or x.shape[1] == 0:
                raise ValueError(f"{where}: input must be token ids of shape (1, T), int, got {_describe(x)}")
            if x.min() < 0 or x.max() >= L.vocab_size:
                raise ValueError(f"{where}: token ids must be in [0, {L.vocab_size}), got {x.min()}..{x.max()}")
            return x.astype(np.int64)
        ok = (isinstance(x, np.ndarray) and x.dtype in (np.float32, np.float16) and x.ndim == 3
              and x.shape[0] == 1 and x.shape[1] > 0 and x.shape[2] == L.hidden_size)
        if not ok:
            raise ValueError(f"{where}: input must be hidden states of shape (1, T, {L.hidden_size}), "
                             f"float32 or float16, got {_describe(x)}")
        return x

    def _infer(self, request_id: str, shard: Shard, x, state):
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if shard != self.shard:  # another call switched the engine's shard meanwhile
            raise ValueError(f"this engine now holds {self.shard}, not {shard}; one engine serves one shard at a time")
        x = self._check_input(shard, x)
        T = x.shape[1]
        req = st.parse_request(state, T)
        tokens = x[0] if shard.is_first_layer() else req.tokens
        if shard.is_first_layer() and req.tokens is not None and not np.array_equal(req.tokens, tokens):
            raise ValueError(f"inference_state['{st.TOKENS}'] differs from the input token ids")
        sess = self._sessions.get(request_id)
        self._check_step(request_id, sess, req, shard, tokens)
        if sess is None:
            sess = self._new_session(request_id, req.settings)
        else:
            self._sessions.move_to_end(request_id)
        try:
            if req.commit is not None:
                self._commit(sess, req.commit)
                sess.pending = None
            committed = sess.ctx.committed
            h = self._forward(sess, x, req)
            if req.is_tree:
                sess.pending = (req.depths, req.tree_mask)
            if not st.speaks_protocol(state):  # stock exo's node: what exo's own engines return, no state
                if shard.is_last_layer():
                    return self._numpy(self._logits(h)).astype(np.float32)[None], None
                return self._hidden_numpy(h), None
            if shard.is_last_layer():
                return self._verify_and_propose(sess, h, req, tokens, committed, state)
            out_state = state
            if req.is_tree and req.tokens is None:
                out_state = {**state, st.TOKENS: tokens}
            return self._hidden_numpy(h), out_state
        except Exception:
            # A failure after the caches were touched leaves them unknown: drop this request only.
            self._sessions.pop(request_id, None)
            raise

    def _check_step(self, request_id: str, sess: Session | None, req: st.StepRequest, shard: Shard, tokens) -> None:
        """Everything that can be wrong with this pass, checked before any cache is touched."""
        if sess is None:
            started = req.commit is not None or req.is_tree or (req.positions is not None and req.positions[0] > 0)
            if started:
                raise ValueError(f"unknown request id '{request_id}' on shard {shard.start_layer}-{shard.end_layer}: "
                                 "it has no cache here (finished, evicted or never started); start it with a prompt")
            committed = 0
        else:
            committed = sess.ctx.committed
            if req.commit is not None:
                if sess.pending is None:
                    raise ValueError(f"request '{request_id}': inference_state['{st.COMMIT}'] given but no tree "
                                     "forward is pending on this shard")
                self._check_path(request_id, req.commit, *sess.pending)
                committed += len(req.commit)
            elif sess.pending is not None:
                raise ValueError(f"request '{request_id}': the last tree forward is not committed; this pass must "
                                 f"carry inference_state['{st.COMMIT}']")
        if req.positions is not None and req.positions[0] != committed:
            raise ValueError(f"request '{request_id}': shard {shard.start_layer}-{shard.end_layer} is at position "
                             f"{committed} but this pass starts at {req.positions[0]}: the ring is out of sync "
                             "(a lost or repeated pass)")
        if shard.is_last_layer():
            if req.is_tree:
                if tokens is None:
                    raise ValueError(f"request '{request_id}': a tree pass reaching the last shard needs "
                                     f"inference_state['{st.TOKENS}']")
                tree = self._loaded.tree
                if not (np.array_equal(req.depths, tree.depths) and np.array_equal(req.tree_mask, tree.mask)):
                    raise ValueError(f"request '{request_id}': the tree in inference_state ({len(req.depths)} nodes) "
                                     f"is not the one this shard proposes ({tree.size} nodes)")
            if sess is None or sess.policy is None:
                s = req.settings
                make_policy(s.temp, s.top_p, s.acceptance, s.seed)  # raises on a bad combination

    @staticmethod
    def _check_path(request_id: str, nodes: np.ndarray, depths: np.ndarray, mask: np.ndarray) -> None:
        T = len(depths)
        ok = nodes.max() < T and all(
            mask[b, a] and depths[b] == depths[a] + 1 for a, b in zip(nodes[:-1], nodes[1:]))
        if not ok:
            raise ValueError(f"request '{request_id}': inference_state['{st.COMMIT}'] {nodes.tolist()} is not a "
                             f"root-to-node path of the pending {T}-node tree")

    def _new_session(self, request_id: str, settings: st.Settings) -> Session:
        ctx, caches = self._new_cache()
        sess = Session(ctx, caches, settings=settings)
        self._sessions[request_id] = sess
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return sess

    # ----------------------------------------------------------------- the last shard

    def _verify_and_propose(self, sess: Session, h, req: st.StepRequest, tokens, committed: int, state):
        """Accept from this pass, emit, and lay out the next pass. ``committed``: position of this pass's root."""
        L = self._loaded
        if sess.policy is None:
            s = sess.settings
            sess.policy = make_policy(s.temp, s.top_p, s.acceptance, s.seed)
            sess.use_heads = L.has_heads and (self.medusa if s.use_heads is None else s.use_heads)
        policy = sess.policy
        T = h.shape[0]
        commit = None
        if req.is_tree:
            # With heads, every node's guesses (as generate_step): the next ones come
            # from the node kept.
            if sess.use_heads:
                logits, every = self._propose(h, committed + req.depths + 1)  # (T, V), (D, T, k)
            else:
                logits = self._logits(h)  # (T, V)
            verdict = self._numpy(logits) if policy.needs_logits else self._numpy(self._argmax(logits))
            acc = policy.accept(L.tree, tokens, verdict)
            emitted, last, commit = acc.tokens, int(acc.nodes[-1]), acc.nodes
            root_pos = committed + len(acc.nodes)
            guesses = every[:, last] if sess.use_heads else None
        elif sess.passes == 0:  # the prompt: the first token, as generate_step does
            logits = self._logits(h)  # (T, V)
            root_pos = committed + T
            first, guesses = self._propose(h[-1], root_pos) if sess.use_heads else (logits[-1], None)
            emitted = [policy.first(self._numpy(first))]
        else:  # a plain step: verify the root alone
            logits = self._logits(h)  # (T, V)
            root_pos = committed + T
            last = logits[-1:]
            verdict = self._numpy(last) if policy.needs_logits else self._numpy(self._argmax(last))
            emitted = policy.accept(ROOT_ONLY, np.zeros(1, dtype=np.int64), verdict).tokens
            guesses = self._propose(h[-1], root_pos)[1] if sess.use_heads else None
        sess.passes += 1

        root = int(emitted[-1])
        out = {k: v for k, v in (state or {}).items() if not k.startswith("medusa_")}
        out.update(st.settings_state(sess.settings))
        out[st.EMITTED] = np.asarray(emitted, dtype=np.int64)
        if commit is not None:
            out[st.NEXT + "commit"] = np.asarray(commit, dtype=np.int64)
        if sess.use_heads:
            tree = L.tree
            out[st.NEXT + "tokens"] = self._lay_out(guesses, root, tree)
            out[st.NEXT + "depths"] = tree.depths.astype(np.int64)
            out[st.NEXT + "tree_mask"] = tree.mask.copy()
            out[st.NEXT + "positions"] = (root_pos + tree.depths).astype(np.int64)
        else:
            out[st.NEXT + "tokens"] = np.array([root], dtype=np.int64)
            out[st.NEXT + "positions"] = np.array([root_pos], dtype=np.int64)
        return self._numpy(logits).astype(np.float32)[None], out

    # ----------------------------------------------------------------- backend hooks

    def _layer_pass(self, sess: Session, h, req: st.StepRequest, concat, settle=None):
        """This shard's layers over ``h`` (1, T, H): a tree pass stays in scratch until
        the next pass commits it; a plain pass is committed at once, in prefill chunks
        (as ``decode.prefill``). ``concat`` joins chunk outputs; ``settle(out, sess)``
        runs after each chunk (MLX evaluates there to bound the graph)."""
        T = h.shape[1]
        ctx = sess.ctx
        if req.is_tree:
            # A chain runs as contiguous tokens, as MedusaModel.forward does.
            if np.array_equal(req.depths, np.arange(T)):
                ctx.begin(n=T)
            else:
                ctx.begin(req.depths, req.tree_mask)
            return self._layers(h, sess)
        outs = []
        for s in range(0, T, PREFILL_STEP):
            chunk = h[:, s : s + PREFILL_STEP]
            ctx.begin(n=chunk.shape[1])
            outs.append(self._layers(chunk, sess))
            ctx.commit(sess.caches, np.arange(chunk.shape[1]))
            if settle is not None:
                settle(outs[-1], sess)
        return outs[0] if len(outs) == 1 else concat(outs)

    def _load_backend(self, shard: Shard, path: Path, heads, tree) -> Loaded:
        raise NotImplementedError

    def _new_cache(self):
        raise NotImplementedError

    def _forward(self, sess: Session, x: np.ndarray, req: st.StepRequest):
        raise NotImplementedError

    def _commit(self, sess: Session, nodes: np.ndarray) -> None:
        sess.ctx.commit(sess.caches, nodes)

    def _logits(self, h):
        raise NotImplementedError

    def _propose(self, h, positions):
        """At hidden states h, (H,) or (T, H): the base logits, (V,) or (T, V), and the top-k
        guesses of the D heads the tree reads, (D, k) or (D, T, k) (``MedusaModel.propose``).

        ``positions``: where the next root sits after each state (an int for one).
        """
        raise NotImplementedError

    def _lay_out(self, guesses, root: int, tree: TreeBuffers) -> np.ndarray:
        """The next pass's tree tokens from the root and the guesses (D, k), (T,) int64."""
        raise NotImplementedError

    def _argmax(self, a):
        raise NotImplementedError

    def _numpy(self, a) -> np.ndarray:
        raise NotImplementedError

    def _hidden_numpy(self, h) -> np.ndarray:
        raise NotImplementedError
