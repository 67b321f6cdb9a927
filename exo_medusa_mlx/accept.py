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


def target_probs(logits: np.ndarray, temp: float, top_p: float = 1.0) -> np.ndarray:
    """The distribution plain sampling draws from: softmax(logits / temp), then top-p.

    logits: (..., V). Top-p keeps the smallest set of most likely tokens whose mass
    reaches ``top_p`` (ties at the boundary kept), renormalised.
    """
    z = logits.astype(np.float64) / temp
    z -= z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, axis=-1)
        before = np.cumsum(sorted_p, axis=-1) - sorted_p  # mass strictly above each token
        keep_sorted = before < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    return p


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

    Each child token x is a point-mass draft (q = delta_x). Walking down from the
    root with the residual target r (initially p, the base model's distribution at
    the node, with temperature and top-p applied exactly as plain sampling does):
    accept child x with probability r(x) = min(1, r(x)/q(x)); if accepted, move to
    that child with r = its p; if rejected, set r(x) = 0 and renormalise, then try
    the next child. When no child is accepted (or the node is a leaf), sample the
    bonus token from r.

    Why it is exact: at a node the emitted token is x with probability
    sum over the children tried of P(reach x's turn) * r_i(x) plus the mass of x in
    the final residual; by induction over the children this equals p(x), the same
    recursion as SpecInfer's multi-draft rejection sampling with point-mass drafts.
    Each emitted token therefore has the base model's conditional distribution
    given the tokens before it, so the sequence is distributed as plain sampling.
    """

    def accept(tree: TreeBuffers, tree_tokens: np.ndarray, logits: np.ndarray) -> Acceptance:
        node, nodes, out = 0, [0], []
        while True:
            r = target_probs(logits[node], temp, top_p)
            nxt = None
            for child in tree.children[node]:
                x = int(tree_tokens[child])
                if rng.random() < r[x]:
                    nxt = child
                    break
                r[x] = 0.0
                s = r.sum()
                if s <= 0.0:  # all mass was on rejected drafts: cannot happen with r(x) < 1
                    break
                r /= s
            if nxt is None:
                out.append(int(rng.choice(len(r), p=r)))
                return Acceptance(np.array(nodes), out)
            out.append(int(tree_tokens[nxt]))
            nodes.append(nxt)
            node = nxt

    return accept


Acceptor = Callable[[TreeBuffers, np.ndarray, np.ndarray], Acceptance]


@dataclass
class Policy:
    """How a run picks tokens: the acceptor, what it needs, and the first token's rule."""

    accept: Acceptor
    needs_logits: bool  # False: the acceptor takes argmax ids (T,), True: logits (T, V)
    first: Callable[[np.ndarray], int]  # logits (V,) after the prompt -> token


def make_policy(temp: float = 0.0, top_p: float = 1.0, acceptance: str = "auto",
                seed: int | None = None) -> Policy:
    """Choose the acceptor once.

    ``acceptance``: "auto" (greedy at temp 0, exact otherwise), "greedy", "exact", "typical".
    """
    if acceptance not in ("auto", "greedy", "exact", "typical"):
        raise ValueError(f"unknown acceptance '{acceptance}': use auto, greedy, exact or typical")
    if temp < 0:
        raise ValueError(f"temperature {temp} must be >= 0")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top-p {top_p} must be in (0, 1]")
    if acceptance == "greedy" or (acceptance == "auto" and temp == 0):
        return Policy(greedy_accept, False, lambda row: int(np.argmax(row)))
    if temp == 0:
        raise ValueError(f"acceptance '{acceptance}' samples: give --temp > 0, or use greedy")
    rng = np.random.default_rng(seed)

    def first(row: np.ndarray) -> int:
        p = target_probs(row, temp, top_p)
        return int(rng.choice(p.shape[-1], p=p))

    make = make_typical_acceptor if acceptance == "typical" else make_exact_acceptor
    return Policy(make(temp, top_p, rng), True, first)
