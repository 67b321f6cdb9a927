"""The Medusa step generator: prefill, then propose, verify, accept, commit."""

from __future__ import annotations

from typing import Iterator

import mlx.core as mx
import numpy as np

from .accept import Policy, make_policy
from .cache import DEFAULT_KEEP
from .slots import PREFILL_STEP
from .model import MedusaModel
from .streaming import Step
from .tree import TreeBuffers, build_tree

ROOT_ONLY = build_tree([])


def topk_ids(logits: mx.array, k: int) -> mx.array:
    """Indices of the k largest logits, best first. logits: (..., V) -> (..., k)."""
    idx = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
    vals = mx.take_along_axis(logits, idx, axis=-1)
    return mx.take_along_axis(idx, mx.argsort(-vals, axis=-1), axis=-1)


def prefill(model: MedusaModel, ctx, caches, prompt: np.ndarray, step: int = PREFILL_STEP) -> mx.array:
    """Commit the prompt; returns the last position's hidden state, (H,)."""
    for s in range(0, len(prompt), step):
        chunk = prompt[s : s + step]
        h = model.forward(ctx, caches, chunk)
        ctx.commit(caches, np.arange(len(chunk)))
        mx.eval([c.state for c in caches])
    return h[-1]


def generate_step(
    prompt: np.ndarray,
    model: MedusaModel,
    policy: Policy | None = None,
    *,
    medusa: bool = True,
    max_kv_size: int | None = None,
    keep: int = DEFAULT_KEEP,
    tree: TreeBuffers | None = None,
) -> Iterator[Step]:
    """Yield the tokens each step emits, forever; the caller stops it.

    With ``medusa=False``, no heads, or a tree of the root alone, every step
    verifies the root alone: plain decoding through the same cache and code.
    """
    policy = policy or make_policy()
    prompt = np.asarray(prompt, dtype=np.int64).reshape(-1)
    ctx, caches = model.make_cache(max_kv_size, keep)
    use_heads = medusa and model.heads is not None and (tree or model.tree).size > 1
    tree = (tree or model.tree) if use_heads else ROOT_ONLY
    if use_heads and tree.depth > model.heads.num_heads:
        raise ValueError(f"tree is {tree.depth} deep but the heads give {model.heads.num_heads} guesses")

    h = prefill(model, ctx, caches, prompt)
    rows = model.project(h, tree.depth) if use_heads else model.logits(h)[None]  # (1+D, V)
    mx.eval(rows)
    root = policy.first(np.array(rows[0]))
    yield Step([root], 0)

    if not use_heads and not policy.needs_logits:
        yield from _plain_greedy(model, ctx, caches, root)
        return

    tree_idx = mx.array(tree.tree_indices)
    guesses = topk_ids(rows[1:], tree.topk) if use_heads else None  # (D, k)
    while True:
        if use_heads:
            flat = mx.concatenate([mx.array([root]), guesses.reshape(-1).astype(mx.int32)])
            tree_tokens = flat[tree_idx]
        else:
            tree_tokens = mx.array([root], dtype=mx.int32)
        h = model.forward(ctx, caches, tree_tokens, tree)  # (T, H)
        if use_heads:
            # Base and head logits of every node in one pass over lm_head: the next
            # guesses come from whichever node is kept, known only after acceptance.
            # Only the heads the tree reads: a tree D deep projects (1+D) rows per node.
            rows = model.project(h, tree.depth)  # (1+D, T, V)
            logits, node_guesses = rows[0], topk_ids(rows[1:], tree.topk)  # (D, T, k)
        else:
            logits, node_guesses = model.logits(h), None  # (T, V)
        verdict = logits if policy.needs_logits else mx.argmax(logits, axis=-1)
        mx.eval(verdict, tree_tokens, node_guesses)
        acc = policy.accept(tree, np.array(tree_tokens), np.array(verdict))
        ctx.commit(caches, acc.nodes)
        root = acc.tokens[-1]
        if use_heads:
            guesses = node_guesses[:, int(acc.nodes[-1])]  # next guesses from the last kept node
        yield Step(acc.tokens, tree.size)


def _plain_greedy(model: MedusaModel, ctx, caches, root: int) -> Iterator[Step]:
    """Plain greedy decoding, pipelined as mlx-lm does: the next forward is queued
    before the current token is read."""

    def step(tok: mx.array) -> mx.array:
        h = model.forward(ctx, caches, tok)
        ctx.commit(caches, np.zeros(1, dtype=np.int64))
        return mx.argmax(model.logits(h[-1]), axis=-1).reshape(1)

    y = step(mx.array([root], dtype=mx.int32))
    mx.async_eval(y)
    while True:
        nxt = step(y)
        mx.async_eval(nxt)
        yield Step([y.item()], 1)
        y = nxt
