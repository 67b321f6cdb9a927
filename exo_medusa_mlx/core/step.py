"""The Medusa step, written once for every caller: verify, accept, commit, propose; and where it ends.

A step verifies the tree in one forward (the base model's verdict at every node
and, at every node, the next tree the heads propose from it), accepts the longest
agreeing path, commits it, and takes the next tree from the last accepted node (a dynamic plan,
``core/dynamic.py``, picks it there from the heads' probabilities). Plain decoding is the
root-only tree. Both backends' ``generate_step``, the batch generator, the exo engines' last shard and
``tune``'s latency probe run this module; a backend supplies the model's array
primitives (``forward``, ``propose``, ``logits``, ``to_numpy``...) and may
override the ``Verifier`` with a fast path (MLX's lookahead, CUDA graphs).

``batch_step`` is the step for B sequences (``Sequence``), each with its own tree,
policy and cache offset: one verification forward over all their trees
(``BatchVerifier``), acceptance per sequence, one commit advancing each by its own
count. One sequence is B = 1 of it: ``generate_step`` runs it over a one-row batch,
or over a backend's single-sequence fast path.

The context's end, for every caller (``tree_at``, ``advance``): a sequence, prompt
and generated tokens, holds at most ``max_position_embeddings`` tokens, the last at
position ``end - 1``. A step's tree keeps only the nodes whose next token still fits
(one position before the end, the root alone), and the step that emits the token at
the last position finishes the sequence with "length". With a rotating window
(``max_kv_size``) positions run on, as mlx-lm's rotating cache: there is no end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .accept import Acceptance, Policy, make_policy
from .dynamic import DynamicTree
from .limits import Limits
from .slots import DEFAULT_KEEP, PREFILL_STEP, run_committed
from .tree import ROOT_ONLY, TreeBuffers, build_tree

LENGTH = "length"  # the finish reason of a sequence that fills the context


@dataclass
class Step:
    tokens: list[int]  # emitted by this verification step (first step: the token after the prompt)
    tree_size: int  # tokens verified in this step's forward (0 for the prefill)
    finish: str | None = None  # "length": the last token fills the context, no step follows


@dataclass
class Verified:
    """What one verification gives the host, as numpy."""

    verdict: np.ndarray  # (T,) the base model's argmax at each node, or (T, V) logits (any policy)
    # (T, S) each node's next tree laid out on the plan (a dynamic plan's: its superset), its root the node's
    # argmax; None: root alone
    drafts: np.ndarray | None
    scores: np.ndarray | None = None  # (T, S) dynamic plans: each candidate's calibrated path log-probability


@dataclass
class Advanced:
    """One verified tree's outcome: what it emits, and the step after it."""

    acc: Acceptance  # nodes to commit, tokens to emit
    root: int  # position of the next step's root: the last token emitted
    tree: TreeBuffers  # the tree the next step verifies (``tree_at``)
    tokens: np.ndarray  # (tree.size,) int64: its tokens, the root the bonus token
    finish: str | None  # "length": the sequence fills the context, no step follows
    select: np.ndarray | None = None  # dynamic plans: the tree's nodes as superset nodes


def context_end(context: int | None, window: int | None) -> int | None:
    """Where a sequence ends: the model's context, unless a rotating window lets positions run on."""
    return None if window is not None else context


def tree_at(tree: TreeBuffers, root: int, end: int | None) -> TreeBuffers:
    """The part of ``tree`` a step rooted at position ``root`` verifies, so no token passes ``end``.

    A node at depth d gives the token at position root + d + 1, which must be below
    ``end``: deeper nodes are cut. Nodes are ordered by depth, so the kept ones are
    the tree's first ones and a draft laid out for ``tree`` holds this one's as its
    first columns. ``tree`` itself (the same object) when nothing is cut.
    """
    if end is None or tree.size == 1 or root + tree.depth + 1 < end:
        return tree
    depth = end - 2 - root
    if depth < 1:
        return ROOT_ONLY
    return build_tree([c for c in tree.choices if len(c) <= depth], topk=tree.topk)


def advance(policy: Policy, verified: TreeBuffers, tokens: np.ndarray, v: Verified, *, root: int = 0,
            plan: TreeBuffers | DynamicTree | None = None, end: int | None = None) -> Advanced:
    """Accept from ``verified`` (its root at position ``root``) and lay out the next step from the
    last kept node, its root the bonus token: the ``plan``'s tree (default ``verified``), or for a
    dynamic plan the one it picks from the node's scores, cut by ``tree_at``.

    After a prefill the verified tree is ``ROOT_ONLY`` at the prompt's last position, whose
    verdict gives the first token. ``v.drafts`` must be laid out on ``plan`` (``read``).
    ``end``: the context (``context_end``).
    """
    verdict = v.verdict
    if verdict.ndim == 2 and not policy.needs_logits:
        verdict = verdict.argmax(-1)  # logits read for a caller that returns them (exo's last shard)
    acc = policy.accept(verified, tokens, verdict)
    root += len(acc.tokens)
    finish = LENGTH if end is not None and root >= end - 1 else None
    if v.drafts is None:
        return Advanced(acc, root, ROOT_ONLY, np.array(acc.tokens[-1:], dtype=np.int64), finish)
    last = int(acc.nodes[-1])
    row, select, picked = v.drafts[last].astype(np.int64), None, verified if plan is None else plan
    if v.scores is not None:
        picked, select = plan.pick(v.scores[last])
        row = row[select]
    nxt_tree = tree_at(picked, root, end)  # a prefix of ``picked``: nodes are ordered by depth
    nxt = row[: nxt_tree.size].copy()
    nxt[0] = acc.tokens[-1]  # sampling may pick another root; its children stay valid candidates
    return Advanced(acc, root, nxt_tree, nxt, finish, None if select is None else select[: nxt_tree.size])


def read(model, h, plan: TreeBuffers | DynamicTree, logits: bool) -> Verified:
    """The verdict and the next tree's candidates at hidden states ``h`` (T, H) (``propose_tree``).

    ``logits``: the policy samples, so the verdict is the logits, not their argmax.
    ``plan``: the tree the next step verifies, or a dynamic plan (only the heads it reads are run).
    """
    return Verified(*model.to_numpy(*read_arrays(model, h, plan, logits)))


def read_arrays(model, h, plan: TreeBuffers | DynamicTree, logits: bool) -> tuple:
    """``read`` before the copy to the host: the backend's arrays (what a CUDA graph returns):
    the verdict, the drafts and (dynamic plans) the scores, None where there are none."""
    scores = None
    if plan.size == 1:
        out, drafts = model.logits(h), None
    elif isinstance(plan, DynamicTree):
        out, drafts, scores = model.propose_scored(h, plan)  # (T, V), (T, S), (T, S)
    else:
        out, drafts = model.propose_tree(h, plan)  # (T, V), (T, T')
    return out if logits else model.argmax(out), drafts, scores


@dataclass(eq=False)
class Sequence:
    """One sequence's decoding state between steps."""

    slots: object  # its ``SlotMap`` (its row of a batch cache): committed count, window
    policy: Policy
    tree: TreeBuffers  # the tree ``tokens`` are laid out on: the next step verifies it
    tokens: np.ndarray  # (tree.size,) int64
    root: int = 0  # position of ``tokens[0]``, the next step's root
    end: int | None = None  # the context's end (``context_end``): None, no end
    finish: str | None = None  # "length": the sequence filled the context, no step follows
    # The tree (or dynamic plan) the next step proposes; a scheduler may set it per step (smaller as
    # the batch fills).
    next_tree: TreeBuffers | DynamicTree | None = None  # None: ``tree`` again
    select: np.ndarray | None = None  # ``tree``'s nodes in a dynamic plan's superset (a fast path reads them)

    def __post_init__(self):
        if self.next_tree is None:
            self.next_tree = self.tree


class Verifier:
    """One sequence's verification forward per step over its own cache; a backend's fast path
    (MLX's lookahead, the torch static step) overrides it. ``batch_step`` runs it as a batch of one."""

    def __init__(self, model, ctx, caches, plan: TreeBuffers | DynamicTree, policy: Policy):
        self.model, self.ctx, self.caches, self.plan, self.policy = model, ctx, caches, plan, policy

    def verify(self, seq: Sequence) -> Verified:
        """Verify ``seq.tokens`` laid out on ``seq.tree``; read the next tree on the plan."""
        h = self.model.forward(self.ctx, self.caches, seq.tokens, seq.tree)  # (T, H)
        return read(self.model, h, self.plan, self.policy.needs_logits)

    def commit(self, nodes: np.ndarray) -> None:
        self.ctx.commit(self.caches, nodes)

    def release(self) -> None:
        """Leave the cache holding the committed tokens alone, for another verifier to go on
        (near the context's end, where the tree is cut); a fast path drops its work in flight."""

    def verify_batch(self, seqs: list[Sequence]) -> list[Verified]:
        (seq,) = seqs  # one sequence, its plan fixed
        return [self.verify(seq)]

    def commit_batch(self, nodes: list[np.ndarray]) -> None:
        (one,) = nodes
        self.commit(one)


class BatchVerifier:
    """One verification forward over every row's tree, padded to one T, over a batch cache.

    Sequences join after their prefill (``join``: their single-sequence cache becomes a row)
    and leave between steps; ``seqs`` is in row order. Rows are read in groups that share
    the tree they verified and the one they propose; one row runs the single-sequence shapes.
    """

    def __init__(self, model):
        self.model = model
        self.ctx, self.caches = model.make_batch_cache()
        self.seqs: list[Sequence] = []

    def join(self, seq: Sequence, ctx, caches) -> None:
        """Add ``seq`` as the last row; ``ctx``, ``caches``: its prefilled single-sequence cache."""
        self.ctx.join(self.caches, ctx, caches)
        self.seqs.append(seq)

    def leave(self, gone: list[Sequence]) -> None:
        keep = [i for i, s in enumerate(self.seqs) if s not in gone]
        self.ctx.leave(self.caches, keep)
        self.seqs = [self.seqs[i] for i in keep]

    def verify_batch(self, seqs: list[Sequence]) -> list[Verified]:
        if seqs != self.seqs:
            raise ValueError("a batch verifies its own rows, in row order: pass its seqs")
        B, T = len(seqs), max(s.tree.size for s in seqs)
        tokens = np.zeros((B, T), dtype=np.int64)  # padding nodes: token 0, never read
        for b, s in enumerate(seqs):
            tokens[b, : s.tree.size] = s.tokens
        self.ctx.begin([s.tree for s in seqs])
        transposed = T > 1 and self.model.transposes(B * T)
        h = self.model.hidden(tokens[0] if B == 1 else tokens, self.caches, transposed)
        return self._read(h if B > 1 else h[None], seqs)  # h: (B, T, H)

    def _read(self, h, seqs: list[Sequence]) -> list[Verified]:
        groups: dict[tuple, list[int]] = {}
        for b, s in enumerate(seqs):
            groups.setdefault((s.tree.size, id(s.next_tree), s.policy.needs_logits), []).append(b)
        arrays = []
        for (T, _, logits), rows in groups.items():
            if len(rows) == 1:
                rows_h = h[rows[0], :T]  # (T, H): one row reads as a single sequence does
            elif len(rows) == h.shape[0]:
                rows_h = h[:, :T]
            else:
                rows_h = self.model.ops.stack([h[b, :T] for b in rows])
            arrays += read_arrays(self.model, rows_h, seqs[rows[0]].next_tree, logits)
        host = self.model.to_numpy(*arrays)  # one wait for every row's verdict
        out: list[Verified | None] = [None] * len(seqs)
        for g, rows in enumerate(groups.values()):
            verdict, drafts, scores = host[3 * g: 3 * g + 3]
            for i, b in enumerate(rows):
                out[b] = Verified(verdict, drafts, scores) if len(rows) == 1 else \
                    Verified(verdict[i], *(None if a is None else a[i] for a in (drafts, scores)))
        return out

    def commit_batch(self, nodes: list[np.ndarray]) -> None:
        self.ctx.commit(self.caches, nodes)


def batch_step(verifier, seqs: list[Sequence]) -> list[Acceptance]:
    """One Medusa step for every sequence: one verification, acceptance per sequence (each with
    its own policy), one commit advancing each by its own count. Each sequence's next tree is
    its ``next_tree`` (cut at the context's end), laid out from its last kept node; a sequence
    that fills the context gets ``finish``. Returns the acceptances, in order."""
    verified = verifier.verify_batch(seqs)
    accs = []
    for s, v in zip(seqs, verified):
        nxt = advance(s.policy, s.tree, s.tokens, v, root=s.root, plan=s.next_tree, end=s.end)
        s.tree, s.tokens, s.root, s.finish, s.select = nxt.tree, nxt.tokens, nxt.root, nxt.finish, nxt.select
        accs.append(nxt.acc)
    verifier.commit_batch([a.nodes for a in accs])
    return accs


def prefill(model, ctx, caches, prompt: np.ndarray, step: int = PREFILL_STEP, check=None):
    """Commit the prompt in chunks; returns the last position's hidden state, (H,).

    ``check()`` runs before each chunk and raises to stop (``limits.CancelToken.check``)."""
    prompt = np.asarray(prompt, dtype=np.int64).reshape(-1)
    if len(prompt) == 0:
        raise ValueError("prompt is empty: give at least one token")
    outs = run_committed(ctx, caches, len(prompt), lambda s, e: model.hidden(prompt[s:e], caches),
                         lambda h: model.settle(caches), step, check)
    return outs[-1][-1]


def start(model, ctx, h, policy: Policy, plan: TreeBuffers | DynamicTree, root: int, end: int | None
          ) -> tuple[Sequence, list[int]]:
    """After a prefill: the first token, the acceptance of the root-only tree at the prompt's
    last hidden state ``h`` (H,) at position ``root``, and the sequence ready for its first step
    over ``plan``'s tree (cut at ``end``, the context's end: ``context_end``)."""
    v = read(model, h[None], plan, policy.needs_logits)
    nxt = advance(policy, ROOT_ONLY, np.zeros(1, dtype=np.int64), v, root=root, plan=plan, end=end)
    seq = Sequence(ctx, policy, nxt.tree, nxt.tokens, nxt.root, end, nxt.finish, next_tree=plan,
                   select=nxt.select)
    return seq, nxt.acc.tokens


def generate_step(prompt, model, policy: Policy | None = None, *, max_kv_size: int | None = None,
                  keep: int = DEFAULT_KEEP, tree: TreeBuffers | DynamicTree | None = None,
                  fast_path: bool | None = None, max_tokens: int | None = None, check=None) -> Iterator[Step]:
    """Yield the tokens each step emits until the sequence fills the model's context (the
    last ``Step`` says "length"; with ``max_kv_size`` never); the caller may stop it before.

    Args:
        prompt: token ids, fewer than the model's context (``LimitError`` otherwise).
        model: either backend's ``MedusaModel``.
        policy: how tokens are picked (``make_policy``); greedy by default.
        max_kv_size: committed-token window (``keep`` sink tokens plus the most recent); None: unbounded.
        tree: the tree to verify, or a dynamic plan (default the model's; ``ROOT_ONLY`` decodes plainly).
        fast_path: the backend's fast verifier (MLX lookahead, CUDA graphs); None: where it pays.
        max_tokens: the most tokens the caller will take, if known: sizes a fast path's static cache.
        check: called between prefill chunks; raises to stop a long prompt (the caller stops
            the steps by no longer iterating).
    """
    policy = policy or make_policy()
    plan = model.tree if tree is None else model.check_tree(tree)
    Limits(model.max_context).check_prompt(len(prompt))  # as every caller's check: room for one token
    end = context_end(model.max_context, max_kv_size)
    ctx, caches = model.make_cache(max_kv_size, keep)
    ctx.planned = None if max_tokens is None else len(prompt) + max_tokens
    h = prefill(model, ctx, caches, prompt, check=check)
    verifier = None if near_end(plan, len(prompt), end) else model.fast_verifier(ctx, caches, plan, policy, fast_path)
    if verifier is not None:
        plan = verifier.plan  # a fast path may fix a dynamic plan's size
    seq, first = start(model, ctx, h, policy, plan, len(prompt) - 1, end)
    yield Step(first, 0, seq.finish)
    while seq.finish is None:
        if verifier is None or (near_end(plan, seq.root, end) and not isinstance(verifier, BatchVerifier)):
            verifier = _batch_of_one(seq, verifier, model, caches)
        size = seq.tree.size
        (acc,) = batch_step(verifier, [seq])
        yield Step(acc.tokens, size, seq.finish)


def near_end(plan: TreeBuffers | DynamicTree, root: int, end: int | None) -> bool:
    """Whether a step rooted at ``root`` may have its tree cut at the context's end (``tree_at``)."""
    return end is not None and plan.size > 1 and root + plan.depth + 1 >= end


def _batch_of_one(seq: Sequence, current: Verifier | None, model, caches) -> BatchVerifier:
    """``seq`` as a batch of one; a fast path (built for its plan's whole trees) hands the
    committed cache over first, as trees are cut at the context's end."""
    if current is not None:
        current.release()
    batch = BatchVerifier(model)
    batch.join(seq, seq.slots, caches)
    return batch


__all__ = ["LENGTH", "ROOT_ONLY", "Advanced", "near_end", "BatchVerifier", "Sequence", "Step", "Verified", "Verifier", "advance",
           "batch_step", "context_end", "generate_step", "prefill", "read", "read_arrays", "start", "tree_at"]
