"""The Medusa step generator on torch: prefill, then propose, verify, accept, commit.

Twin of ``exo_medusa_mlx.decode``; the acceptors are the shared numpy ones.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ..accept import Policy, make_policy
from ..slots import PREFILL_STEP
from ..streaming import Step
from ..tree import TreeBuffers, build_tree
from .cache import DEFAULT_KEEP
from .graphs import GraphedVerify, static_len_for, use_graphs
from .model import MedusaModel, topk_ids  # noqa: F401 (topk_ids: imported from here)

ROOT_ONLY = build_tree([])


def prefill(model: MedusaModel, ctx, caches, prompt: np.ndarray, step: int = PREFILL_STEP) -> torch.Tensor:
    """Commit the prompt; returns the last position's hidden state, (H,)."""
    if len(prompt) == 0:
        raise ValueError("prompt is empty: give at least one token")
    for s in range(0, len(prompt), step):
        chunk = prompt[s : s + step]
        h = model.forward(ctx, caches, chunk)
        ctx.commit(caches, np.arange(len(chunk)))
    return h[-1]


@torch.inference_mode()
def generate_step(
    prompt: np.ndarray,
    model: MedusaModel,
    policy: Policy | None = None,
    *,
    medusa: bool = True,
    max_kv_size: int | None = None,
    keep: int = DEFAULT_KEEP,
    tree: TreeBuffers | None = None,
    graphs: bool | None = None,
) -> Iterator[Step]:
    """Yield the tokens each step emits, forever; the caller stops it.

    With ``medusa=False``, no heads, or a tree of the root alone, every step
    verifies the root alone: plain decoding through the same cache and code. ``graphs``: replay the verify
    forward from a CUDA graph (None: on CUDA devices only).
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
    root = policy.first(logits.float().cpu().numpy())
    yield Step([root], 0)

    verify = None
    if use_graphs(model, graphs):
        ctx.static_len = static_len_for(ctx, tree.size)  # the prefill ran dynamic; verify steps are static
        verify = GraphedVerify(model, ctx, caches, tree, heads=use_heads)
    tree_idx = torch.from_numpy(tree.tree_indices).to(model.device)
    while True:
        if use_heads:
            flat = torch.cat([guesses.new_tensor([root]), guesses.reshape(-1)])
            tree_tokens = flat[tree_idx]  # (T,)
        else:
            tree_tokens = torch.tensor([root], device=model.device)
        if verify is not None:
            logits, node_guesses = verify(tree_tokens)
        else:
            h = model.forward(ctx, caches, tree_tokens, tree)  # (T, H)
            # With heads: every node's guesses, since the next ones come from the node
            # kept, known after acceptance; only the heads the tree reads.
            logits, node_guesses = model.propose(h, tree.depth, tree.topk) if use_heads else (model.logits(h), None)
        verdict = logits.float() if policy.needs_logits else logits.argmax(dim=-1)  # (T, V) / (T,)
        acc = policy.accept(tree, tree_tokens.cpu().numpy(), verdict.cpu().numpy())
        ctx.commit(caches, acc.nodes)
        root = acc.tokens[-1]
        if use_heads:
            # (D, k) from the last kept node; a copy, since a graph replay overwrites its output buffers
            guesses = node_guesses[:, int(acc.nodes[-1])].clone()
        yield Step(acc.tokens, tree.size)
