"""The Medusa step generator: prefill, then propose, verify, accept, commit."""

from __future__ import annotations

from typing import Iterator

import mlx.core as mx
import numpy as np

from .accept import Policy, greedy_accept, make_policy
from .cache import DEFAULT_KEEP, TreeOffset
from .slots import PREFILL_STEP
from .model import MedusaModel, topk_ids  # noqa: F401 (topk_ids: imported from here)
from .streaming import Step
from .tree import TreeBuffers, build_tree

ROOT_ONLY = build_tree([])
COMPACT_AT = 256  # pipelined decoding gathers its rejected slots away once there are this many


def prefill(model: MedusaModel, ctx, caches, prompt: np.ndarray, step: int = PREFILL_STEP) -> mx.array:
    """Commit the prompt; returns the last position's hidden state, (H,)."""
    if len(prompt) == 0:
        raise ValueError("prompt is empty: give at least one token")
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
    pipelined: bool | None = None,
) -> Iterator[Step]:
    """Yield the tokens each step emits, forever; the caller stops it.

    With ``medusa=False``, no heads, or a tree of the root alone, every step
    verifies the root alone: plain decoding through the same cache and code.
    ``pipelined``: run greedy Medusa over an unbounded cache as
    ``_pipelined_greedy`` (the same tokens); None: on a GPU only. MLX's CPU
    stream lets an asynchronous evaluation run only a few ops ahead of the
    caller, so on a CPU nothing overlaps and the device-side verdict costs a
    little more than the host's.
    """
    policy = policy or make_policy()
    prompt = np.asarray(prompt, dtype=np.int64).reshape(-1)
    ctx, caches = model.make_cache(max_kv_size, keep)
    use_heads = medusa and model.heads is not None and (tree or model.tree).size > 1
    tree = (tree or model.tree) if use_heads else ROOT_ONLY
    if use_heads and tree.depth > model.heads.num_heads:
        raise ValueError(f"tree is {tree.depth} deep but the heads give {model.heads.num_heads} guesses")

    h = prefill(model, ctx, caches, prompt)
    if use_heads:
        logits, guesses = model.propose(h, tree.depth, tree.topk)  # (V,), (D, k)
    else:
        logits, guesses = model.logits(h), None
    mx.eval(logits, guesses)
    root = policy.first(np.array(logits))
    yield Step([root], 0)

    if not use_heads and not policy.needs_logits:
        yield from _plain_greedy(model, ctx, caches, root)
        return

    tree_idx = mx.array(tree.tree_indices)
    if pipelined is None:
        pipelined = mx.default_device() != mx.cpu
    if use_heads and pipelined and policy.accept is greedy_accept and max_kv_size is None:
        yield from _pipelined_greedy(model, ctx, caches, root, guesses, tree)
        return
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
            logits, node_guesses = model.propose(h, tree.depth, tree.topk)  # (T, V), (D, T, k)
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


def _pipelined_greedy(model: MedusaModel, ctx, caches, root: int, guesses: mx.array,
                      tree: TreeBuffers) -> Iterator[Step]:
    """Greedy Medusa that queues the next verification before reading this one.

    The host-side loop (read the verdict, accept, commit, build the next graph)
    otherwise leaves the CPU or GPU idle for a few ms every step. Here the greedy
    verdict is computed on the device, and so that the next forward does not
    depend on how many tokens were accepted, each forward's T nodes stay in the
    slots they were written to: the rejected ones become holes, hidden from later
    queries by a mask computed on the device, as are the RoPE positions. The
    emitted tokens are read one step late, as mlx-lm does for plain decoding, and
    the holes are gathered away once there are ``COMPACT_AT`` of them.
    Emits the same tokens as ``greedy_accept``: each step keeps the longest path
    whose candidates equal the base model's argmax (sibling candidates differ, so
    that path is unique whenever it is longer than the root).
    """
    T, D = tree.size, tree.depth
    ri = np.where(tree.retrieve_indices >= 0, tree.retrieve_indices, 0)  # (P, D+1)
    ri_dev = mx.array(ri, dtype=mx.int32)
    on_path = mx.array(tree.retrieve_indices[:, 1:] >= 0)
    tree_idx = mx.array(tree.tree_indices)
    tree_mask = mx.array(tree.mask)
    depths = mx.array(tree.depths, dtype=mx.int32)
    nodes = mx.arange(T, dtype=mx.int32)
    ranks = mx.arange(D + 1, dtype=mx.int32)

    def lay_out(root: mx.array, guesses: mx.array) -> mx.array:
        return mx.concatenate([root.reshape(1), guesses.reshape(-1).astype(mx.int32)])[tree_idx]

    def step(tokens: mx.array, pos: mx.array, valid: mx.array):
        mask = mx.concatenate([mx.broadcast_to(valid[None], (T, ctx.used)), tree_mask], axis=1)
        h = model.forward(ctx, caches, tokens, tree, placed=(mask, pos if tree.is_chain else TreeOffset(pos + depths)))
        logits, node_guesses = model.propose(h, D, tree.topk)  # (T, V), (D, T, k)
        argmax = mx.argmax(logits, axis=-1).astype(mx.int32)  # (T,)
        ok = on_path & (tokens[ri_dev[:, 1:]] == argmax[ri_dev[:, :-1]])  # (P, D)
        n_acc = mx.cumprod(ok.astype(mx.int32), axis=1).sum(axis=1)  # (P,)
        best = mx.argmax(n_acc)
        a = n_acc[best]
        path = ri_dev[best]  # (D+1,)
        last = path[a]
        kept = ((nodes[None] == path[:, None]) & (ranks <= a)[:, None]).any(axis=0)  # (T,)
        nxt = (lay_out(argmax[last], node_guesses[:, last]), pos + a + 1, mx.concatenate([valid, kept]))
        return (tokens, argmax, best, a), nxt

    state = (lay_out(mx.array(root, dtype=mx.int32), guesses), mx.array(ctx.committed, dtype=mx.int32),
             mx.ones((ctx.used,), dtype=mx.bool_))
    host_valid = np.ones(ctx.used, dtype=bool)  # slots of the steps read so far
    out, state = step(*state)
    mx.async_eval(out, state)
    while True:
        holes = len(host_valid) - int(host_valid.sum())
        if holes >= COMPACT_AT:
            slots = np.concatenate([np.flatnonzero(host_valid), np.arange(len(host_valid), ctx.used)])
            ctx.compact(caches, slots)
            state = (state[0], state[1], state[2][mx.array(slots)])
            host_valid = np.ones(int(host_valid.sum()), dtype=bool)
        nxt_out, state = step(*state)
        mx.async_eval(nxt_out, state)
        tokens, argmax, best, a = (np.array(x) for x in out)
        path = ri[int(best), : int(a) + 1]
        kept = np.zeros(T, dtype=bool)
        kept[path] = True
        host_valid = np.concatenate([host_valid, kept])
        yield Step(tokens[path[1:]].tolist() + [int(argmax[path[-1]])], T)
        out = nxt_out
