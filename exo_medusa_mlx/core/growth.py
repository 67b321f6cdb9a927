"""Growing the tree for given heads and hardware, from numbers alone (numpy): accuracies in, tree out.

``tune`` measures the heads' top-k accuracy on held-out data and the latency of a
decoding step with N tree tokens; ``grow_tree`` picks the tree with the most
expected tokens per second, E[accepted + 1] / latency(N). The reference grows by
expected length alone, which on a CPU picks trees slower than plain decoding.
"""

from __future__ import annotations

import heapq

import numpy as np

from .tree import build_tree

TOPK = 10  # ranks per head considered (the reference's TOPK)


def topk_accuracy(ranks: np.ndarray, topk: int = TOPK) -> np.ndarray:
    """(K, topk): fraction of rows whose target is within head i's top-(k+1)."""
    valid = ranks >= 0
    return np.stack([((ranks >= 0) & (ranks <= k)).sum(0) / np.maximum(valid.sum(0), 1) for k in range(topk)], axis=1)


def conditional_accuracy(ranks: np.ndarray, topk: int = TOPK, min_rows: int = 50) -> np.ndarray:
    """(K, topk): P(head d's target is at rank r | heads 0..d-1 were right at rank 0).

    Heads are correlated (an easy stretch of text is easy for all of them), so
    the chance that a deep node survives is its own accuracy given that its
    ancestors did. The condition is the all-top-1 prefix, which carries most of
    a tree's mass; the product of these along a path approximates the path's
    acceptance. Falls back to the marginal when fewer than ``min_rows`` qualify.
    """
    K = ranks.shape[1]
    acc = np.zeros((K, topk))
    for d in range(K):
        rows = ranks[:, d] >= 0
        cond = rows & (ranks[:, :d] == 0).all(axis=1)
        sel = cond if cond.sum() >= min_rows else rows
        r = ranks[sel, d]
        acc[d] = [(r == k).mean() if len(r) else 0.0 for k in range(topk)]
    return acc


def empirical_accept_length(ranks: np.ndarray, choices) -> float:
    """E[accepted + 1] of a tree on held-out rows, counted exactly (no independence assumed).

    Under greedy acceptance a node is kept iff every rank along its path matches.
    """
    total = 1.0
    for p in choices:
        total += float((ranks[:, : len(p)] == np.asarray(p)).all(axis=1).mean())
    return total


def gather_fraction(ranks: np.ndarray, choices) -> float:
    """Share of held-out rows whose accepted nodes are not already in place (nodes
    0..k-1 of the tree's order), so their commit gathers (see ``measure_gather``)."""
    tree = build_tree(choices)
    node_of = {tuple(p): k + 1 for k, p in enumerate(tree.choices)}
    moved = 0
    for r in ranks:
        nodes, path = [0], ()
        for d in range(tree.depth):
            path = path + (int(r[d]),)
            if path not in node_of:
                break
            nodes.append(node_of[path])
        moved += nodes != list(range(len(nodes)))
    return moved / max(len(ranks), 1)


# --------------------------------------------------------------------------- tree growth


def latency_table(latency, max_nodes: int) -> np.ndarray:
    """Seconds per step for 0..max_nodes tree nodes (index = nodes; [0] unused).

    ``latency``: {nodes: seconds} (interpolated between keys, extended linearly
    past the last one) or a sequence whose element i is the latency of i+1 nodes.
    """
    if isinstance(latency, dict):
        keys = np.array(sorted(int(k) for k in latency), dtype=np.float64)
        vals = np.array([float(latency[k] if k in latency else latency[str(int(k))]) for k in keys.astype(int)])
    else:
        vals = np.asarray(latency, dtype=np.float64).reshape(-1)
        keys = np.arange(1, len(vals) + 1, dtype=np.float64)
    if len(vals) == 0 or (vals <= 0).any():
        raise ValueError("latency must hold positive seconds for at least one tree size")
    n = np.arange(max_nodes + 1, dtype=np.float64)
    out = np.interp(n, keys, vals)
    if len(keys) >= 2:
        slope = (vals[-1] - vals[-2]) / (keys[-1] - keys[-2])
        out = np.where(n > keys[-1], vals[-1] + slope * (n - keys[-1]), out)
    return out


def grow_tree(accuracies, latency, max_nodes: int, return_info: bool = False, min_nodes: int = 1):
    """The tree of at most ``max_nodes`` nodes (root included) with the most expected tokens per second.

    accuracies: (heads, topk), the chance that head d's rank-r guess is right
    given its parent was; a path's acceptance is the product along it.
    latency: seconds per verification step by node count (see ``latency_table``).

    For a given size, the best tree holds the most probable paths, and a child is
    never more probable than its parent, so adding paths best-first gives the best
    tree of every size at once; the size with the highest E[accepted + 1] / latency
    wins (sizes below ``min_nodes`` are not considered). Ties break on the path
    (shorter, then smaller ranks): deterministic. Returns choices (list of paths), and with ``return_info`` also a dict with
    ``expected_accept_length``, ``tokens_per_second`` and ``speedup`` (vs one node).
    """
    acc = np.asarray(accuracies, dtype=np.float64)
    if acc.ndim != 2 or acc.shape[0] == 0 or acc.shape[1] == 0:
        raise ValueError(f"accuracies must be a (heads, topk) array, got shape {acc.shape}")
    if not 1 <= min_nodes <= max_nodes:
        raise ValueError(f"need 1 <= min_nodes ({min_nodes}) <= max_nodes ({max_nodes}); 1 is the root alone")
    depth, topk = acc.shape
    lat = latency_table(latency, max_nodes)
    frontier = [(-acc[0, r], (r,)) for r in range(topk)]
    heapq.heapify(frontier)
    paths, expected = [], 1.0
    best = (1.0 / lat[1] if min_nodes == 1 else -1.0, 0, 1.0)  # (tokens/s, paths kept, expected length)
    while frontier and len(paths) + 1 < max_nodes:
        neg_p, path = heapq.heappop(frontier)
        paths.append(path)
        expected += -neg_p
        rate = expected / lat[len(paths) + 1]
        if len(paths) + 1 >= min_nodes and rate > best[0] * (1 + 1e-9):
            best = (rate, len(paths), expected)
        if len(path) < depth:
            for r in range(topk):
                heapq.heappush(frontier, (neg_p * acc[len(path), r], path + (r,)))
    choices = [list(p) for p in paths[: best[1]]]
    if not return_info:
        return choices
    return choices, {"expected_accept_length": best[2], "tokens_per_second": best[0], "speedup": best[0] * lat[1]}
