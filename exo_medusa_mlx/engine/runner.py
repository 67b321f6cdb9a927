"""One loaded shard's ring passes, synchronously: a pass in, its output and the next state out.

No asyncio and no threads here: the exo engines call ``ShardRunner`` on their worker
thread (``shard_engine.py``); a test or a distributed rank may call it directly.

``check`` looks at a whole pass before anything changes: its input and keys
(``protocol``), whether it fits the request's cache and the model's ``Limits``, and on
the last shard whether its tree is the one this shard laid out. ``run`` then commits
the previous tree's accepted nodes, runs the shard's layers, and on the last shard
takes the Medusa step (``core.step``): the pass's tokens are accepted and emitted and
the next pass is laid out, the tree cut at the context's end, where the request ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..core.accept import make_policy
from ..core.limits import Limits
from ..core.slots import DEFAULT_KEEP, run_committed
from ..core.step import ROOT_ONLY, advance, context_end, read
from . import protocol as st
from .loaded import LoadedShard
from .sessions import Session

Check = Callable[[], None]  # raises ``Cancelled`` once the pass is cancelled


@dataclass
class Pass:
    """One ring pass, checked against the request's session on this shard."""

    request_id: str
    x: np.ndarray  # token ids (1, T) on the first shard, hidden states (1, T, H) elsewhere
    state: dict | None  # the pass's inference_state, as it came
    req: st.StepRequest  # its Medusa keys, parsed
    tokens: np.ndarray | None  # its token ids: the input on the first shard, a tree's on the last
    root: int  # position of its first token, once the previous tree's nodes are committed
    session: Session  # the request's caches here (a new, empty one on its first pass)
    new: bool  # the session was made for this pass: the caller keeps it


class ShardRunner:
    """Runs the passes of one loaded shard over the requests' sessions.

    Args:
        loaded: the shard's model on its backend (``LoadedShard``).
        context: positions the model was made for.
        medusa: propose Medusa trees when the model has heads (a request may override).
        max_kv_size: bounded rotating cache per request (None: unbounded, and the context ends it).
        keep: sink tokens the rotating cache keeps.
    """

    def __init__(self, loaded: LoadedShard, context: int, *, medusa: bool = True, max_kv_size: int | None = None,
                 keep: int = DEFAULT_KEEP):
        self.loaded, self.medusa, self.max_kv_size, self.keep = loaded, medusa, max_kv_size, keep
        self.limits = Limits(context, max_kv_size)
        self.end = context_end(context, max_kv_size)

    @property
    def shard(self):
        return self.loaded.shard

    @property
    def model(self):
        return self.loaded.model

    def check(self, request_id: str, sess: Session | None, x: np.ndarray, state: dict | None) -> Pass:
        """The pass, checked whole before any cache changes; one-line ``ValueError`` / ``LimitError``.

        ``sess``: the request's session on this shard, None on its first pass (a new one is made).
        """
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        shard, limits = self.shard, self.limits
        x = st.check_input(shard, x, self.model.hidden_size, self.model.vocab_size, limits)
        req = st.parse_request(state, x.shape[1], limits.max_tree)
        tokens = x[0] if shard.is_first_layer() else req.tokens
        if shard.is_first_layer() and req.tokens is not None and not np.array_equal(req.tokens, tokens):
            raise ValueError(f"inference_state['{st.TOKENS}'] differs from the input token ids")
        committed = sess.ctx.committed if sess else 0
        st.check_pass(request_id, req, shard, sess is not None, committed, sess.pending if sess else None,
                      x.shape[1], limits)
        root = committed + (0 if req.commit is None else len(req.commit))
        new = sess is None
        if new:
            sess = self.new_session(req.settings)
        if shard.is_last_layer():
            st.check_tree_pass(request_id, req, tokens, sess.proposed)  # a dynamic plan's changes every pass
        return Pass(request_id, x, state, req, tokens, root, sess, new)

    def new_session(self, settings: st.Settings) -> Session:
        """An empty cache for a request; on the last shard, how it decodes, chosen once."""
        ctx, caches = self.loaded.new_cache(self.max_kv_size, self.keep)
        if not self.shard.is_last_layer():
            return Session(ctx, caches, settings)
        s = settings
        policy = make_policy(s.temp, s.top_p, s.acceptance, s.seed)  # raises on a bad combination
        tree = self.model.tree if (self.medusa if s.medusa is None else s.medusa) else ROOT_ONLY
        return Session(ctx, caches, settings, policy=policy, tree=tree)

    def run(self, p: Pass, check: Check | None = None) -> tuple[np.ndarray, dict | None]:
        """Run a checked pass: its output ((1, T, H) hidden states, or the last shard's (1, T, V)
        logits) and the state for the next shard. ``check`` is called between prefill chunks
        and layers. A failure leaves the session's cache unknown: the caller drops it."""
        sess, req = p.session, p.req
        with self.loaded.running():
            if req.commit is not None:
                sess.ctx.commit(sess.caches, req.commit)
                sess.pending = None
            h = self._forward(p, check)
            if req.is_tree:
                sess.pending = (req.depths, req.tree_mask)
            stock = not st.speaks_protocol(p.state)  # stock exo's node: what exo's own engines return, no state
            if self.shard.is_last_layer():
                if stock:
                    return self.model.to_numpy(self.model.logits(h))[0].astype(np.float32)[None], None
                return self.emit(p, h)
            out_state = None if stock else p.state
            if req.is_tree and req.tokens is None:
                out_state = {**p.state, st.TOKENS: p.tokens}
            return self.model.to_numpy(h)[0][None], out_state

    def _forward(self, p: Pass, check: Check | None):
        """This shard's layers over the pass, (T, H) (normed on the last shard). A tree pass stays
        in scratch until the next pass commits it; a plain run is committed at once, in chunks."""
        loaded, model, sess = self.loaded, self.model, p.session
        h = loaded.device_array(p.x)
        if self.shard.is_first_layer():
            h = model.embed(h)  # (1, T, H)
        ctx, T = sess.ctx, h.shape[1]
        if p.req.is_tree:
            ctx.begin(p.req.depths, p.req.tree_mask)
            out = loaded.layers(h, sess, model.transposes(T), check)[0]
        else:
            outs = run_committed(ctx, sess.caches, T, lambda s, e: loaded.layers(h[:, s:e], sess, False, check)[0],
                                 lambda o: model.settle(sess.caches), check=check)
            out = outs[0] if len(outs) == 1 else model.ops.concat(outs)
        return model.base.model.norm(out) if self.shard.is_last_layer() else out

    def emit(self, p: Pass, h) -> tuple[np.ndarray, dict]:
        """The last shard's Medusa step over the pass's normed states ``h`` (T, H) (``core.step``):
        accept, emit, and lay out the next pass. Returns the logits (1, T, V) and the output state.

        A plain run (the prompt, or one token) is committed already: its last position is
        verified as a root-only tree, as after ``generate_step``'s prefill.
        """
        sess, req = p.session, p.req
        if req.is_tree:
            verified, tokens, root, rows = sess.proposed, p.tokens, p.root, h
        else:
            verified, tokens, root, rows = ROOT_ONLY, np.zeros(1, np.int64), p.root + h.shape[0] - 1, h[-1:]
        v = read(self.model, rows, sess.tree, logits=True)
        # exo's contract: the last shard returns the logits of every position of the pass; a
        # tree's or one token's are the verdict already (the vocabulary projection runs once).
        logits = v.verdict if rows.shape[0] == h.shape[0] else self.model.to_numpy(self.model.logits(h))[0]
        nxt = advance(sess.policy, verified, tokens, v, root=root, plan=sess.tree, end=self.end)
        sess.proposed = nxt.tree
        return logits.astype(np.float32)[None], st.pass_output(p.state, sess.settings, nxt, req.is_tree)
