"""The Medusa step, written once for every caller: verify, accept, commit, propose.

A step verifies the tree in one forward (the base model's verdict at every node
and, at every node, the next tree the heads propose from it), accepts the longest
agreeing path, commits it, and takes the next tree from the last accepted node. Plain decoding is the
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
    drafts: np.ndarray | None  # (T, T') each node's next tree, its root the node's argmax; None: root alone


def advance(policy: Policy, tree: TreeBuffers, tokens: np.ndarray, v: Verified) -> tuple[Acceptance, np.ndarray]:
    """Accept from a verified ``tree`` and take the next tree from the last kept node, its
    root the bonus token. After a prefill the verified tree is ``ROOT_ONLY``: the prompt's
    last position, whose verdict gives the first token.

    Returns the acceptance (nodes to commit, tokens to emit) and the next tree's tokens (T',) int64.
    """
    acc = policy.accept(tree, tokens, v.verdict)
    if v.drafts is None:
        return acc, np.array(acc.tokens[-1:], dtype=np.int64)
    nxt = v.drafts[int(acc.nodes[-1])].astype(np.int64)
    nxt[0] = acc.tokens[-1]  # sampling may pick another root; its children stay valid candidates
    return acc, nxt


def read(model, h, tree: TreeBuffers, logits: bool) -> Verified:
    """The verdict and the next tree's tokens at hidden states ``h`` (T, H) (``propose_tree``).

    ``logits``: the policy samples, so the verdict is the logits, not their argmax.
    ``tree``: the tree the next step verifies (only the heads it reads are run).
    """
    return Verified(*model.to_numpy(*read_arrays(model, h, tree, logits)))


def read_arrays(model, h, tree: TreeBuffers, logits: bool) -> tuple:
    """``read`` before the copy to the host: the backend's arrays (what a CUDA graph returns)."""
    if tree.size > 1:
        out, drafts = model.propose_tree(h, tree)  # (T, V), (T, T')
    else:
        out, drafts = model.logits(h), None
    return out if logits else model.argmax(out), drafts


class Verifier:
    """One verification forward per step over the model's cache; a backend's fast path overrides it."""

    def __init__(self, model, ctx, caches, tree: TreeBuffers, policy: Policy):
        self.model, self.ctx, self.caches, self.tree, self.policy = model, ctx, caches, tree, policy

    def verify(self, tokens: np.ndarray) -> Verified:
        h = self.model.forward(self.ctx, self.caches, tokens, self.tree)  # (T, H)
        return read(self.model, h, self.tree, self.policy.needs_logits)

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
        tree: the tree to verify (default the model's; ``ROOT_ONLY`` decodes plainly).
        fast_path: the backend's fast verifier (MLX lookahead, CUDA graphs); None: where it pays.
        max_tokens: the most tokens the caller will take, if known: sizes a fast path's static cache.
        check: called between prefill chunks; raises to stop a long prompt (the caller stops
            the steps by no longer iterating).
    """
    policy = policy or make_policy()
    tree = model.tree if tree is None else model.check_tree(tree)
    ctx, caches = model.make_cache(max_kv_size, keep)
    ctx.planned = None if max_tokens is None else len(prompt) + max_tokens
    h = prefill(model, ctx, caches, prompt, check=check)[None]  # (1, H): the prompt's last position
    acc, tokens = advance(policy, ROOT_ONLY, np.zeros(1, dtype=np.int64), read(model, h, tree, policy.needs_logits))
    yield Step(acc.tokens, 0)
    verifier = model.verifier(ctx, caches, tree, policy, fast_path)
    while True:
        acc, nxt = advance(policy, tree, tokens, verifier.verify(tokens))
        verifier.commit(acc.nodes)
        yield Step(acc.tokens, tree.size)
        tokens = nxt


__all__ = ["ROOT_ONLY", "Step", "Verified", "Verifier", "advance", "generate_step", "prefill", "read", "read_arrays"]
