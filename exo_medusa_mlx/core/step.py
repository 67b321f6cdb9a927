"""The Medusa step, written once for every caller: verify, accept, commit, propose.

A step verifies the tree in one forward (the base model's verdict at every node
and, at every node, the next tree the heads propose from it), accepts the longest
agreeing path, commits it, and takes the next tree from the last accepted node (a dynamic plan,
``core/dynamic.py``, picks it there from the heads' probabilities). Plain decoding is the
root-only tree. Both backends' ``generate_step``, the exo engines' last shard and
``tune``'s latency probe run this module; a backend supplies the model's array
primitives (``forward``, ``propose``, ``logits``, ``to_numpy``...) and may
override the ``Verifier`` with a fast path (MLX's lookahead, CUDA graphs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .accept import Acceptance, Policy, make_policy
from .dynamic import DynamicTree
from .slots import DEFAULT_KEEP, PREFILL_STEP, run_committed
from .tree import ROOT_ONLY, TreeBuffers


@dataclass
class Step:
    tokens: list[int]  # emitted by this verification step (first step: the token after the prompt)
    tree_size: int  # tokens verified in this step's forward (0 for the prefill)


@dataclass
class Verified:
    """What one verification gives the host, as numpy."""

    verdict: np.ndarray  # (T,) the base model's argmax at each node, or (T, V) logits when the policy samples
    # (T, S) each node's next tree laid out on the plan (a dynamic plan's: its superset), its root the node's
    # argmax; None: root alone
    drafts: np.ndarray | None
    scores: np.ndarray | None = None  # (T, S) dynamic plans: each candidate's calibrated path log-probability


@dataclass
class Proposal:
    """The next step's tree and its tokens."""

    tokens: np.ndarray  # (T,) int64, laid out on ``tree``
    tree: TreeBuffers
    select: np.ndarray | None = None  # dynamic plans: the tree's nodes as superset nodes


def advance(policy: Policy, tree: TreeBuffers, tokens: np.ndarray, v: Verified,
            plan: TreeBuffers | DynamicTree) -> tuple[Acceptance, Proposal]:
    """Accept from a verified ``tree`` and take the next tree from the last kept node, its
    root the bonus token: the ``plan``'s tree, or for a dynamic plan the one it picks from the
    node's scores. After a prefill the verified tree is ``ROOT_ONLY``: the prompt's last
    position, whose verdict gives the first token.

    Returns the acceptance (nodes to commit, tokens to emit) and the next step's proposal.
    """
    acc = policy.accept(tree, tokens, v.verdict)
    if v.drafts is None:
        return acc, Proposal(np.array(acc.tokens[-1:], dtype=np.int64), ROOT_ONLY)
    last = int(acc.nodes[-1])
    row = v.drafts[last].astype(np.int64)
    if v.scores is None:
        nxt = Proposal(row, plan)
    else:
        picked, select = plan.pick(v.scores[last])
        nxt = Proposal(row[select], picked, select)
    nxt.tokens[0] = acc.tokens[-1]  # sampling may pick another root; its children stay valid candidates
    return acc, nxt


def read(model, h, plan: TreeBuffers | DynamicTree, logits: bool) -> Verified:
    """The verdict and the next tree's candidates at hidden states ``h`` (T, H) (``propose_tree``).

    ``logits``: the policy samples, so the verdict is the logits, not their argmax.
    ``plan``: the tree the next step verifies, or a dynamic plan (only the heads it reads are run).
    """
    return Verified(*model.to_numpy(*read_arrays(model, h, plan, logits)))


def read_arrays(model, h, plan: TreeBuffers | DynamicTree, logits: bool) -> tuple:
    """``read`` before the copy to the host: the backend's arrays (what a CUDA graph returns)."""
    scores = None
    if plan.size == 1:
        out, drafts = model.logits(h), None
    elif isinstance(plan, DynamicTree):
        out, drafts, scores = model.propose_scored(h, plan)  # (T, V), (T, S), (T, S)
    else:
        out, drafts = model.propose_tree(h, plan)  # (T, V), (T, T')
    return out if logits else model.argmax(out), drafts, scores


class Verifier:
    """One verification forward per step over the model's cache; a backend's fast path overrides it."""

    def __init__(self, model, ctx, caches, plan: TreeBuffers | DynamicTree, policy: Policy):
        self.model, self.ctx, self.caches, self.plan, self.policy = model, ctx, caches, plan, policy

    def verify(self, nxt: Proposal) -> Verified:
        h = self.model.forward(self.ctx, self.caches, nxt.tokens, nxt.tree)  # (T, H)
        return read(self.model, h, self.plan, self.policy.needs_logits)

    def commit(self, nodes: np.ndarray) -> None:
        self.ctx.commit(self.caches, nodes)


def prefill(model, ctx, caches, prompt: np.ndarray, step: int = PREFILL_STEP, check=None):
    """Commit the prompt in chunks; returns the last position's hidden state, (H,).

    ``check()`` runs before each chunk and raises to stop (``limits.CancelToken.check``)."""
    prompt = np.asarray(prompt, dtype=np.int64).reshape(-1)
    if len(prompt) == 0:
        raise ValueError("prompt is empty: give at least one token")
    outs = run_committed(ctx, caches, len(prompt), lambda s, e: model.hidden(prompt[s:e], caches),
                         lambda h: model.settle(caches), step, check)
    return outs[-1][-1]


def generate_step(prompt, model, policy: Policy | None = None, *, max_kv_size: int | None = None,
                  keep: int = DEFAULT_KEEP, tree: TreeBuffers | None = None,
                  fast_path: bool | None = None, max_tokens: int | None = None, check=None) -> Iterator[Step]:
    """Yield the tokens each step emits, forever; the caller stops it.

    Args:
        prompt: token ids.
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
    ctx, caches = model.make_cache(max_kv_size, keep)
    ctx.planned = None if max_tokens is None else len(prompt) + max_tokens
    h = prefill(model, ctx, caches, prompt, check=check)[None]  # (1, H): the prompt's last position
    verifier = model.verifier(ctx, caches, plan, policy, fast_path)
    plan = verifier.plan  # a fast path may fix a dynamic plan's size
    acc, nxt = advance(policy, ROOT_ONLY, np.zeros(1, dtype=np.int64), read(model, h, plan, policy.needs_logits), plan)
    yield Step(acc.tokens, 0)
    while True:
        acc, after = advance(policy, nxt.tree, nxt.tokens, verifier.verify(nxt), plan)
        verifier.commit(acc.nodes)
        yield Step(acc.tokens, nxt.tree.size)
        nxt = after


__all__ = ["ROOT_ONLY", "Proposal", "Step", "Verified", "Verifier", "advance", "generate_step", "prefill", "read",
           "read_arrays"]
