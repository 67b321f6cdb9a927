"""Verify-and-accept math, framework-neutral (numpy), shared by both backends.

An acceptor takes the tree, the T candidate tokens laid out on it, and the base
model's verdict at every node (argmax ids for greedy, logits otherwise), and
returns which nodes to keep and which tokens to emit: the accepted candidates
after the root, then one bonus token from the base model after the last of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .tree import TreeBuffers

# Reference typical-acceptance defaults (its code swaps them in one place; these
# are the values its paper and CLI use).
TYPICAL_THRESHOLD = 0.09
TYPICAL_ALPHA = 0.3


@dataclass
class Acceptance:
    nodes: np.ndarray  # tree nodes to commit, root first: (a+1,)
    tokens: list[int]  # emitted: a accepted candidates, then the bonus token


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def target_probs(logits: np.ndarray, temp: float, top_p: float = 1.0, min_p: float = 0.0,
                 top_k: int = 0) -> np.ndarray:
    """The distribution plain sampling draws from, the same as mlx-lm's ``make_sampler(temp, top_p,
    min_p, top_k=top_k)``.

    logits: (..., V). mlx-lm filters the log-probabilities, then draws from
    softmax(kept / temp). Top-p keeps every token whose strictly more likely tokens
    hold less than ``top_p`` of the mass (ties at the boundary are all kept),
    measured, as mlx-lm's ``apply_top_p`` does, on softmax(logits) before the
    temperature; min-p keeps the tokens at least ``min_p`` times as likely as the
    most likely one; top-k the ``top_k`` most likely (0: all; at or above the
    vocabulary: all). Each filter keeps the most likely token and top-p runs first,
    on the whole distribution, so the kept set is the intersection of the three.
    HF transformers and the Medusa reference apply the temperature first, so
    their top-p set differs whenever temp != 1. Ours is computed in float64,
    mlx-lm's in float32: they differ only for a token within rounding of a
    boundary (and top-k's choice among tied logits).
    """
    z = logits.astype(np.float64)
    keep = np.ones(z.shape, dtype=bool)
    if top_p < 1.0:
        desc = -np.sort(-z, axis=-1)
        p = _softmax(desc)
        before = np.cumsum(p, axis=-1) - p  # mass of the tokens sorted before each one
        n_keep = (before < top_p).sum(axis=-1, keepdims=True)  # >= 1: the first has none before
        # Comparing logits (not probabilities, which may underflow) keeps ties as mlx-lm does.
        keep &= z >= np.take_along_axis(desc, n_keep - 1, axis=-1)
    if min_p > 0.0:  # log p >= log p_max + log min_p, on logits: the normaliser cancels
        keep &= z >= z.max(axis=-1, keepdims=True) + np.log(min_p)
    if 0 < top_k < z.shape[-1]:
        kth = -np.partition(-z, top_k - 1, axis=-1)[..., top_k - 1 : top_k]
        keep &= z >= kth
    return _softmax(np.where(keep, z, -np.inf) / temp)


def _paths(tree: TreeBuffers, tree_tokens: np.ndarray):
    r = tree.retrieve_indices
    valid = r >= 0
    ri = np.where(valid, r, 0)
    return ri, valid, tree_tokens[ri]


def greedy_accept(tree: TreeBuffers, tree_tokens: np.ndarray, argmax: np.ndarray) -> Acceptance:
    """Lossless at temperature 0: keep the longest path the base model agrees with.

    argmax: (T,) the base model's next token after each node.
    """
    ri, valid, cand = _paths(tree, tree_tokens)  # (P, D+1)
    pred = argmax[ri]  # model's choice after each path position
    ok = valid[:, 1:] & (cand[:, 1:] == pred[:, :-1])  # candidate j+1 agrees with model at j
    n_acc = np.cumprod(ok, axis=1).sum(axis=1)  # (P,)
    best = int(np.argmax(n_acc))
    a = int(n_acc[best])
    nodes = ri[best, : a + 1]
    return Acceptance(nodes, cand[best, 1 : a + 1].tolist() + [int(argmax[nodes[-1]])])


def make_typical_acceptor(temp: float, top_p: float, rng: np.random.Generator,
                          threshold: float = TYPICAL_THRESHOLD, alpha: float = TYPICAL_ALPHA):
    """The reference's typical acceptance (fast, but not the model's distribution).

    A candidate is kept when its probability under the base model exceeds
    ``min(threshold, alpha * exp(-entropy))``; ties between equally long paths go
    to the larger summed log-probability; the bonus token is sampled from the target.
    """

    def accept(tree: TreeBuffers, tree_tokens: np.ndarray, logits: np.ndarray) -> Acceptance:
        p = target_probs(logits, temp, top_p)  # (T, V)
        ri, valid, cand = _paths(tree, tree_tokens)
        prob = p[ri[:, :-1], cand[:, 1:]]  # (P, D): prob of child under its parent
        ent = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)).sum(-1)[ri[:, :-1]]
        ok = valid[:, 1:] & (prob > np.minimum(threshold, alpha * np.exp(-ent)))
        acc = np.cumprod(ok, axis=1)
        n_acc = acc.sum(axis=1)
        a = int(n_acc.max())
        if a == 0:
            best = 0
        else:
            score = (np.log(np.maximum(prob, 1e-30)) * acc).sum(axis=1)
            best = int(np.argmax(np.where(n_acc == a, score, -np.inf)))
        nodes = ri[best, : a + 1]
        bonus = int(rng.choice(p.shape[-1], p=p[nodes[-1]]))
        return Acceptance(nodes, cand[best, 1 : a + 1].tolist() + [bonus])

    return accept


def make_exact_acceptor(temp: float, top_p: float, rng: np.random.Generator):
    """Exact speculative sampling over a tree of deterministic top-k children.

    Each child token x is a point-mass draft (q = delta_x), so the usual
    acceptance min(1, r(x)/q(x)) is just r(x). At a node, r starts as p, the base
    model's distribution there (``target_probs``, as plain sampling). The children
    are tried in rank order: accept x with probability r(x); on rejection set
    r(x) = 0 and renormalise (r becomes r conditioned on "not x"), then try the
    next child. If no child is accepted, or the node is a leaf, the bonus token
    is drawn from r and the walk ends; an accepted child becomes the next node.

    Why it is exact: trying x_1, x_2, ... in turn and finally drawing from the
    residual is drawing from p by asking "is it x_i?" one token at a time, so
    P(emit x_i) = (1 - p(x_1) - ... - p(x_{i-1})) * p(x_i) / (1 - p(x_1) - ... - p(x_{i-1}))
    = p(x_i), and any token that is not a child keeps its share p(y). (A repeated
    child has r = 0 by its second turn and is never accepted.) After an accepted
    x the walk continues with p(. | prefix, x), from the tree forward. So every
    emitted token is drawn from the base model's distribution given the tokens
    before it: the sequence is distributed as plain sampling. This needs the
    candidates to be chosen without looking at this step's random draws: the
    heads' top-k is a function of the prefix. It is SpecInfer's multi-draft
    rejection sampling with point-mass drafts.
    """

    def accept(tree: TreeBuffers, tree_tokens: np.ndarray, logits: np.ndarray) -> Acceptance:
        return exact_walk(tree, tree_tokens, lambda node: target_probs(logits[node], temp, top_p), rng)

    return accept


def exact_walk(tree: TreeBuffers, tree_tokens: np.ndarray, target: Callable[[int], np.ndarray],
               rng: np.random.Generator) -> Acceptance:
    """``make_exact_acceptor``'s walk down the tree; ``target(node)`` is the (V,) distribution
    plain sampling draws from after that node's path (a fresh array: the walk changes it)."""
    node, nodes, out = 0, [0], []
    while True:
        r = target(node)  # (V,) residual target at this node
        nxt = None
        for child in tree.children[node]:
            x = int(tree_tokens[child])
            if rng.random() < r[x]:
                nxt = child
                break
            # Rejected, so r(x) < 1 and some mass is left elsewhere.
            r[x] = 0.0
            r /= r.sum()
        if nxt is None:
            out.append(int(rng.choice(len(r), p=r)))
            return Acceptance(np.array(nodes), out)
        out.append(int(tree_tokens[nxt]))
        nodes.append(nxt)
        node = nxt


Acceptor = Callable[[TreeBuffers, np.ndarray, np.ndarray], Acceptance]


@dataclass
class Policy:
    """How a run picks tokens: the acceptor, and what it needs. The first token after
    the prompt is the acceptance of the root-only tree at the prompt's last position."""

    accept: Acceptor
    needs_logits: bool  # False: the acceptor takes argmax ids (T,), True: logits (T, V)


def make_policy(temp: float = 0.0, top_p: float = 1.0, acceptance: str = "auto",
                seed: int | None = None) -> Policy:
    """Choose the acceptor once.

    ``acceptance``: "auto" (greedy at temp 0, exact otherwise), "greedy", "exact", "typical".
    """
    if acceptance not in ("auto", "greedy", "exact", "typical"):
        raise ValueError(f"unknown acceptance '{acceptance}': use auto, greedy, exact or typical")
    if not 0 <= temp < float("inf"):  # NaN and inf too: inf would sample uniformly
        raise ValueError(f"temperature {temp} must be a finite number >= 0")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top-p {top_p} must be in (0, 1]")
    if seed is not None and seed < 0:
        raise ValueError(f"seed {seed} must be a non-negative integer")
    if acceptance == "greedy" or (acceptance == "auto" and temp == 0):
        return Policy(greedy_accept, False)
    if temp == 0:
        raise ValueError(f"acceptance '{acceptance}' samples: give --temp > 0, or use greedy")
    make = make_typical_acceptor if acceptance == "typical" else make_exact_acceptor
    return Policy(make(temp, top_p, np.random.default_rng(seed)), True)
