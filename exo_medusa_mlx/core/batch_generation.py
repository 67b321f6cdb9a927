"""Continuous batching with Medusa, in mlx-lm's shape: ``BatchGenerator`` and ``batch_generate``, either backend.

Requests are inserted with their own settings (``max_tokens``, a ``Policy`` from
``make_policy``: temperature, top-p, seed, acceptance; stop strings; a tree) and
decode together: every ``next()`` runs one ``batch_step`` over the running
requests (one verification forward over all their trees) and returns one
``Response`` per token emitted. A request leaves the batch when it ends (EOS,
``max_tokens``, a stop string, the model's context) or is removed (``remove``:
a cancelled request); the others go on unchanged.

Joining: a request's prompt runs alone, then it joins the batch with its first token.
Between two decoding steps ``next()`` prefills up to ``prefill_step_size`` prompt tokens,
over as many waiting requests as they cover (a burst of short prompts joins at once; a
long prompt takes one chunk per step).
Not chunked beside the running decodes: on a CPU a forward of a few hundred
tokens already keeps every core busy, so prefill rows in the decoding forward
would save nothing and pad every decoding row to the chunk's length; one chunk
per step bounds how long the running requests wait.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .accept import Policy, make_policy
from .dynamic import DynamicTree
from .generation import DEFAULT_MAX_TOKENS, TokenText, check_request
from .tokens import encode_prompt, eos_ids
from .limits import check_prompt_text
from .slots import DEFAULT_KEEP, PREFILL_STEP
from .step import ROOT_ONLY, BatchVerifier, Sequence, batch_step, context_end, prefill, start
from .tree import TreeBuffers

DEFAULT_COMPLETION_BATCH = 32  # requests decoding at once, as mlx-lm's completion_batch_size


@dataclass
class BatchStats:
    prompt_tokens: int = 0
    prompt_time: float = 0.0
    generation_tokens: int = 0
    generation_time: float = 0.0  # decoding steps (the first token of each request counts as prompt)
    steps: int = 0  # batched verification steps
    rows: int = 0  # tokens verified over all steps (each step: B rows x T, padding included)
    peak_memory: float = 0.0  # GB

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / max(self.prompt_time, 1e-9)

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / max(self.generation_time, 1e-9)


@dataclass(eq=False)
class _Request:
    uid: int
    prompt: np.ndarray
    policy: Policy
    tree: TreeBuffers | DynamicTree
    out: TokenText
    cache: tuple | None = None  # (ctx, caches) while its prompt is prefilled
    done: int = 0  # prompt tokens prefilled
    seq: Sequence | None = None
    steps: int = 0
    verified: int = 0  # tokens emitted by its verification steps


class BatchGenerator:
    """Medusa decoding of many requests in one batch; requests join and leave between steps.

    Args:
        model, tokenizer: from either backend's ``load``.
        max_tokens: the default per request.
        completion_batch_size: requests decoding at once; more wait their turn.
        prefill_step_size: prompt tokens prefilled between two decoding steps, over the waiting
            requests (a longer prompt takes one such chunk per step).
        max_kv_size, keep: each request's committed-token window (None: unbounded).
        medusa: False decodes plainly (root-only trees) through the same step.
    """

    @dataclass
    class Response:
        uid: int
        token: int
        text: str  # the new text piece (stop strings never appear)
        finish_reason: str | None  # "stop" (EOS or a stop string), "length", or None
        accepted: int  # tokens emitted by this token's step
        generation_tokens: int
        steps: int  # this request's verification steps so far
        mean_accepted: float  # its tokens per verification step

    def __init__(self, model, tokenizer, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                 completion_batch_size: int = DEFAULT_COMPLETION_BATCH, prefill_step_size: int = PREFILL_STEP,
                 max_kv_size: int | None = None, keep: int = DEFAULT_KEEP, medusa: bool = True):
        if completion_batch_size < 1 or prefill_step_size < 1:
            raise ValueError(f"completion_batch_size {completion_batch_size} and prefill_step_size "
                             f"{prefill_step_size} must be at least 1")
        self.model, self.tokenizer = model, tokenizer
        self.max_tokens, self.max_kv_size, self.keep = max_tokens, max_kv_size, keep
        self.completion_batch_size, self.prefill_step_size = completion_batch_size, prefill_step_size
        self.default_tree = model.tree if medusa else ROOT_ONLY
        # The scheduler's hook: tree_for(batch size, the request's own tree or dynamic plan) -> the one
        # a sequence proposes next (its first when it joins, then at every step; ``core.budget``).
        self.tree_for: Callable[[int, TreeBuffers | DynamicTree], TreeBuffers | DynamicTree] | None = None
        self.stats = BatchStats()
        self._eos = eos_ids(tokenizer, model.eos_token_ids)
        self._uids = 0
        self._pending: deque[_Request] = deque()
        self._batch = BatchVerifier(model)
        self._running: dict[Sequence, _Request] = {}
        model.reset_peak_memory()

    def __len__(self) -> int:
        """Requests not yet finished (waiting or decoding)."""
        return len(self._pending) + len(self._running)

    def insert(self, prompts: list, max_tokens: list[int] | None = None, policies: list[Policy] | None = None,
               stops: list[list[str]] | None = None, trees: list[TreeBuffers | None] | None = None) -> list[int]:
        """Queue requests (strings or token ids), each with its own settings; returns their uids.

        ``policies``: from ``make_policy`` (greedy by default), one per request: a sampling
        policy holds its request's random state. Every request is checked before any is queued.
        """
        n = len(prompts)
        max_tokens = max_tokens or [self.max_tokens] * n
        policies = policies or [make_policy()] * n
        stops, trees = stops or [None] * n, trees or [None] * n
        for name, v in (("max_tokens", max_tokens), ("policies", policies), ("stops", stops), ("trees", trees)):
            if len(v) != n:
                raise ValueError(f"{name} has {len(v)} entries for {n} prompts: give one per prompt")
        reqs = []
        for p, m, pol, st, tr in zip(prompts, max_tokens, policies, stops, trees):
            check_prompt_text(self.tokenizer, p, self.model.max_context)
            ids = encode_prompt(self.tokenizer, p)
            check_request(ids, self.model.max_context, m, self.max_kv_size, self.keep)
            tree = self.default_tree if tr is None else self.model.check_tree(tr)
            out = TokenText(self.model.detokenizer(self.tokenizer), self._eos, m, st)
            reqs.append(_Request(self._uids + len(reqs), ids, pol, tree, out))
        self._uids += n
        self._pending.extend(reqs)
        return [r.uid for r in reqs]

    def remove(self, uids: list[int]) -> dict[int, str]:
        """Cancel requests, waiting or decoding; the others go on. Unknown uids are ignored.

        Returns the text each decoding request still held back (the start of a possible stop
        string, an unfinished character), by uid: the end of a request stopped at a limit."""
        uids = set(uids)
        self._pending = deque(r for r in self._pending if r.uid not in uids)
        gone = [s for s, r in self._running.items() if r.uid in uids]
        held = {self._running[s].uid: self._running[s].out.end() for s in gone}
        self._leave(gone)
        return held

    def next(self) -> list[Response]:
        """One decoding step for the running requests, and a prefill chunk for a waiting one if
        there is room; repeated until some token is emitted. [] when no request is left."""
        out: list[BatchGenerator.Response] = []
        while not out and len(self):
            if self._running:
                out += self._decode()
            room = self.prefill_step_size  # prompt tokens between two steps, over every waiting request
            while room > 0 and self._pending and len(self._running) < self.completion_batch_size:
                used, joined = self._prefill(room)
                out, room = out + joined, room - used
        self.stats.peak_memory = self.model.peak_memory_gb()
        return out

    # ------------------------------------------------------------ internals

    def _prefill(self, room: int) -> tuple[int, list[Response]]:
        """Up to ``room`` more tokens of the first waiting prompt; a prompt done joins the batch.
        Returns the tokens prefilled and the responses of its first token."""
        r = self._pending[0]
        tic = time.perf_counter()
        if r.cache is None:
            r.cache = self.model.make_cache(self.max_kv_size, self.keep)
        chunk = r.prompt[r.done : r.done + room]
        h = prefill(self.model, *r.cache, chunk, self.prefill_step_size)
        r.done += len(chunk)
        if r.done < len(r.prompt):
            self.stats.prompt_time += time.perf_counter() - tic
            return len(chunk), []
        self._pending.popleft()
        end = context_end(self.model.max_context, self.max_kv_size)
        plan = self._tree(len(self._running) + 1, r)
        r.seq, first = start(self.model, r.cache[0], h, r.policy, plan, len(r.prompt) - 1, end)
        self.stats.prompt_time += time.perf_counter() - tic
        self.stats.prompt_tokens += len(r.prompt)
        out = self._emit(r, first, r.seq.finish)
        if not out[-1].finish_reason:
            self._batch.join(r.seq, *r.cache)
            self._running[r.seq] = r
        r.cache = None
        return len(chunk), out

    def _decode(self) -> list[Response]:
        seqs = self._batch.seqs
        if self.tree_for is not None:
            for s in seqs:
                s.next_tree = self._tree(len(seqs), self._running[s])
        tic = time.perf_counter()
        rows = len(seqs) * max(s.tree.size for s in seqs)
        accs = batch_step(self._batch, seqs)
        self.stats.generation_time += time.perf_counter() - tic
        self.stats.steps += 1
        self.stats.rows += rows
        out, gone = [], []
        for s, acc in zip(list(seqs), accs):
            r = self._running[s]
            r.steps += 1
            r.verified += len(acc.tokens)
            emitted = self._emit(r, acc.tokens, s.finish)
            self.stats.generation_tokens += len(emitted)
            if emitted[-1].finish_reason:
                gone.append(s)
            out += emitted
        self._leave(gone)
        return out

    def _tree(self, batch: int, r: _Request) -> TreeBuffers | DynamicTree:
        """The tree (or dynamic plan) ``r`` proposes next in a batch of ``batch``: its own, or the scheduler's pick."""
        return r.tree if self.tree_for is None else self.model.check_tree(self.tree_for(batch, r.tree))

    def _emit(self, r: _Request, tokens: list[int], ends: str | None = None) -> list[Response]:
        """One response per token; ``ends``: the sequence ends after the last ("length": the context)."""
        out = []
        for i, tok in enumerate(tokens):
            text, finish = r.out.add(tok, ends if i == len(tokens) - 1 else None)
            out.append(self.Response(r.uid, tok, text, finish, len(tokens), r.out.n, r.steps,
                                     r.verified / r.steps if r.steps else 0.0))
            if finish:
                break
        return out

    def _leave(self, gone: list[Sequence]) -> None:
        if gone:
            self._batch.leave(gone)
            for s in gone:
                del self._running[s]


@dataclass
class BatchResponse:
    texts: list[str]
    stats: BatchStats
    token_ids: list[list[int]] | None = None  # with ``return_token_ids`` (EOS not included)
    finish_reasons: list[str] = field(default_factory=list)


def _each(value, n: int, name: str) -> list:
    """A per-prompt list from one value or a list of ``n``."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts: give one value or one per prompt")
        return list(value)
    return [value] * n


def batch_generate(model, tokenizer, prompts: list, max_tokens: int | list[int] = DEFAULT_MAX_TOKENS,
                   verbose: bool = False, return_token_ids: bool = False, temp: float | list = 0.0,
                   top_p: float | list = 1.0, seed: int | None | list = None, acceptance: str = "auto",
                   stop: list[str] | None = None, **kwargs) -> BatchResponse:
    """Generate a response for every prompt, decoded together (mlx-lm's ``batch_generate``).

    ``max_tokens``, ``temp``, ``top_p``, ``seed``: one value for all, or one per prompt (each
    request samples with its own random state, as it would alone with that seed). ``stop``:
    stop strings for every request. ``kwargs``: as ``BatchGenerator``.
    """
    n = len(prompts)
    policies = [make_policy(t, p, acceptance, s)
                for t, p, s in zip(_each(temp, n, "temp"), _each(top_p, n, "top_p"), _each(seed, n, "seed"))]
    gen = BatchGenerator(model, tokenizer, **kwargs)
    uids = gen.insert(prompts, _each(max_tokens, n, "max_tokens"), policies, [stop] * n if stop else None)
    texts, tokens, finish = ({u: "" for u in uids}, {u: [] for u in uids}, {})
    eos = eos_ids(tokenizer, model.eos_token_ids)
    while responses := gen.next():
        for r in responses:
            texts[r.uid] += r.text
            if not (r.finish_reason == "stop" and r.token in eos):
                tokens[r.uid].append(r.token)
            if r.finish_reason:
                finish[r.uid] = r.finish_reason
                if verbose:
                    print(f"[batch_generate] Finished processing {len(finish)}/{n} ...", end="\r")
    st = gen.stats
    if verbose:
        print(f"\n[batch_generate] Prompt: {st.prompt_tokens} tokens, {st.prompt_tps:.3f} tokens-per-sec")
        print(f"[batch_generate] Generation: {st.generation_tokens} tokens, {st.generation_tps:.3f} tokens-per-sec")
        print(f"[batch_generate] Medusa: {st.steps} batched steps, {st.rows} rows verified")
        print(f"[batch_generate] Peak memory: {st.peak_memory:.3f} GB")
    return BatchResponse([texts[u] for u in uids], st, [tokens[u] for u in uids] if return_token_ids else None,
                         [finish[u] for u in uids])
