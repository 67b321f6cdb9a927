"""The Medusa step, written once for every caller: lay out, verify, accept, propose.

A step lays the root and the heads' guesses out on the tree, verifies the tree
in one forward (the base model's verdict at every node and the heads' next
guesses at every node), accepts the longest agreeing path, commits it, and takes
the next root and guesses from the last accepted node. Plain decoding is the
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
    guesses: np.ndarray | None  # (D, T, k) the heads' top-k at each node; None for the root-only tree


def lay_out(tree: TreeBuffers, root: int, guesses: np.ndarray | None) -> np.ndarray:
    """The tree's tokens, (T,) int64: the root, then the guesses (D, k) by ``tree.tree_indices``."""
    if tree.size == 1:
        return np.array([root], dtype=np.int64)
    flat = np.concatenate([[root], np.asarray(guesses).reshape(-1)])  # [root, head0 top-k, head1 top-k, ...]
    return flat[tree.tree_indices].astype(np.int64)


def advance(policy: Policy, tree: TreeBuffers, tokens: np.ndarray, v: Verified,
            next_tree: TreeBuffers | None = None) -> tuple[Acceptance, np.ndarray]:
    """Accept from a verified ``tree`` and lay out the next tree (``next_tree``, default the
    same) from the last kept node. After a prefill the verified tree is ``ROOT_ONLY``: the
    prompt's last position, whose verdict gives the first token.

    Returns the acceptance (nodes to commit, tokens to emit) and the next tree's tokens.
    """
    acc = policy.accept(tree, tokens, v.verdict)
    guesses = None if v.guesses is None else v.guesses[:, int(acc.nodes[-1])]
    return acc, lay_out(tree if next_tree is None else next_tree, acc.tokens[-1], guesses)


def read(model, h, tree: TreeBuffers, logits: bool) -> Verified:
    """The verdict and next guesses at hidden states ``h`` (T, H) (or (H,): one row).

    ``logits``: the policy samples, so the verdict is the logits, not their argmax.
    Only the heads the tree reads are projected.
    """
    if tree.size > 1:
        out, guesses = model.propose(h, tree.depth, tree.topk)  # (..., V), (D, ..., k)
    else:
        out, guesses = model.logits(h), None
    verdict, guesses = model.to_numpy(out if logits else model.argmax(out), guesses)
    return Verified(verdict, guesses)


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
                  fast_path: bool | None = None, check=None) -> Iterator[Step]:
    """Yield the tokens each step emits, forever; the caller stops it.

    Args:
        prompt: token ids.
        model: either backend's ``MedusaModel``.
        policy: how tokens are picked (``make_policy``); greedy by default.
        max_kv_size: committed-token window (``keep`` sink tokens plus the most recent); None: unbounded.
        tree: the tree to verify (default the model's; ``ROOT_ONLY`` decodes plainly).
        fast_path: the backend's fast verifier (MLX lookahead, CUDA graphs); None: where it pays.
        check: called between prefill chunks; raises to stop a long prompt (the caller stops
            the steps by no longer iterating).
    """
    policy = policy or make_policy()
    tree = model.tree if tree is None else model.check_tree(tree)
    ctx, caches = model.make_cache(max_kv_size, keep)
    h = prefill(model, ctx, caches, prompt, check=check)[None]  # (1, H): the prompt's last position
    acc, tokens = advance(policy, ROOT_ONLY, np.zeros(1, dtype=np.int64), read(model, h, tree, policy.needs_logits),
                          tree)
    yield Step(acc.tokens, 0)
    verifier = model.verifier(ctx, caches, tree, policy, fast_path)
    while True:
        acc, nxt = advance(policy, tree, tokens, verifier.verify(tokens))
        verifier.commit(acc.nodes)
        yield Step(acc.tokens, tree.size)
        tokens = nxt


__all__ = ["ROOT_ONLY", "Step", "Verified", "Verifier", "advance", "generate_step", "lay_out", "prefill", "read"]
