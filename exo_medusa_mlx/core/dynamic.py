"""Dynamic trees: each step's tree chosen from the heads' own probabilities at the node it extends (numpy).

A dynamic plan holds a fixed *superset* tree: every path that can be among the
``max_nodes`` best for some probabilities (a path is never more probable than a
path of smaller ranks at each depth, nor than its prefixes). Each step scores the
superset's nodes at every verified node (``MedusaBase.propose_scored``: a node's
score is the log of the product of its path's calibrated head probabilities, on
the device), and ``pick`` keeps the N best nodes of the last accepted one, ranked
by (score, then superset order: shallower first). A child scores no higher than its
parent and comes after it, so the pick is always a tree. N is the size in ``sizes``
with the most expected tokens per unit of this machine's step cost; the root alone
(plain decoding) is among them, so the plan never picks a tree it expects to be
slower than plain decoding.

The heads' softmax probabilities are calibrated to acceptance rates: per head,
rate = min(1, exp(log_scale + power * log p)), fitted by ``fit_calibration`` on
held-out rows (``mlx_medusa tune`` stores it in the tuned tree file).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .limits import MAX_TREE_NODES
from .tree import ROOT_ONLY, TreeBuffers, build_tree

DYNAMIC = "dynamic"
BEST = "best"  # best:N, the static tree of N nodes that accepts the most (to compare a dynamic run with)
DEFAULT_MAX_NODES = 16  # "dynamic" without ":N"; the cost curve decides how many of them a step uses
TOPK = 10  # ranks per head a dynamic tree may use (the reference's TOPK)
BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # sizes a step may verify
COST_SLOPE = 0.06  # a step's cost per extra node, relative to a plain step, when nothing was measured
MIN_CALIBRATION_ROWS = 50


def dynamic_nodes(spec) -> int | None:
    """N for a ``dynamic:N`` tree spec (``DEFAULT_MAX_NODES`` for ``dynamic``); None for any other spec."""
    return _sized(spec, DYNAMIC, DEFAULT_MAX_NODES, "the most nodes a step verifies")


def best_nodes(spec) -> int | None:
    """N for a ``best:N`` tree spec: the best static tree of N nodes for the heads (``best_choices``)."""
    return _sized(spec, BEST, None, "its nodes")


def _sized(spec, name: str, default: int | None, what: str) -> int | None:
    if not isinstance(spec, str) or not (spec == name or spec.startswith(name + ":")):
        return None
    n = spec[len(name) + 1:] if spec != name else str(default)
    if not n.isdigit() or not 1 <= int(n) <= MAX_TREE_NODES:
        form = f"{name} or {name}:N" if default else f"{name}:N"
        raise ValueError(f"tree '{spec}': name it {form}, N {what} (1..{MAX_TREE_NODES}), e.g. {name}:8")
    return int(n)


def best_choices(facts: dict, n: int) -> list[list[int]]:
    """The static tree of ``n`` nodes that accepts the most for the heads whose tuned facts these are:
    the first n-1 paths of ``mlx_medusa tune``'s longest-accepting tree (the best tree of every size is
    a prefix of it), else grown from the recorded accuracies."""
    from .growth import grow_tree

    longest, acc = facts.get("max_nodes_choices"), facts.get("head_conditional_accuracy")
    if isinstance(longest, list) and len(longest) >= n - 1:
        return [list(p) for p in longest[: n - 1]]
    if acc is None:
        raise ValueError(f"tree 'best:{n}' needs the heads' tuned tree file (mlx_medusa tune writes it): "
                         "these heads have none, or it holds fewer nodes; name a preset instead")
    return grow_tree(np.asarray(acc), {1: 1.0}, n, min_nodes=n)


def checked_spec(spec):
    """A tree spec checked before a model loads: a static tree's buffers, or a spec the heads resolve
    (``dynamic[:N]``, ``best:N``) as it is (``MedusaBase.plan``)."""
    from .tree import load_tree

    return spec if dynamic_nodes(spec) is not None or best_nodes(spec) is not None else load_tree(spec)


def superset_paths(max_nodes: int, depth: int, topk: int) -> list[tuple[int, ...]]:
    """Every path (ranks < ``topk``, at most ``depth`` deep) that can be among the ``max_nodes`` best.

    A path p = (r_1..r_d) ranks below every path q of j <= d ranks with q_i <= r_i
    (Sum_j Prod_{i<=j} (r_i + 1) of them, p included), so it can be kept only if
    they all fit beside the root.
    """
    out = []

    def grow(path: tuple[int, ...], count: int, prod: int) -> None:
        for r in range(topk):
            p = prod * (r + 1)
            if count + p > max_nodes - 1:
                return  # larger ranks only count more
            out.append(path + (r,))
            if len(path) + 1 < depth:
                grow(path + (r,), count + p, p)

    if depth > 0:
        grow((), 0, 1)
    return sorted(out, key=lambda p: (len(p), p))


@dataclass(frozen=True)
class Calibration:
    """Per head d: acceptance rate = min(1, exp(log_scale[d] + power[d] * log p)), p the head's probability."""

    log_scale: tuple[float, ...]
    power: tuple[float, ...]

    @classmethod
    def identity(cls, depth: int) -> "Calibration":
        return cls((0.0,) * depth, (1.0,) * depth)

    @classmethod
    def from_json(cls, d: dict | None, depth: int) -> "Calibration":
        """A tree file's ``calibration`` (None or too few heads: the raw probabilities)."""
        if not isinstance(d, dict) or len(d.get("log_scale", ())) < depth or len(d.get("power", ())) < depth:
            return cls.identity(depth)
        scale, power = d["log_scale"][:depth], d["power"][:depth]
        return cls(tuple(float(x) for x in scale), tuple(max(float(x), 0.0) for x in power))

    def to_json(self) -> dict:
        return {"log_scale": [round(x, 4) for x in self.log_scale], "power": [round(x, 4) for x in self.power]}

    def log_rate(self, logp, d: int):
        """log of head ``d``'s calibrated rate at log-probabilities ``logp`` (any array type), <= 0."""
        x = self.log_scale[d] + self.power[d] * logp
        return x * (x < 0)  # min(x, 0) in operators every backend has


def fit_calibration(logp: np.ndarray, ranks: np.ndarray, min_rows: int = MIN_CALIBRATION_ROWS) -> Calibration:
    """Fit each head's (log_scale, power) to held-out acceptance by maximum likelihood.

    logp: (rows, K, k) log-probabilities of each head's top-k guesses; ranks: (rows, K)
    the base model's token's rank among them (-1: no target, >= k: not among them).
    Head d is fitted on the rows where heads < d were right at rank 0 (a node is tried
    only once its parent was accepted), else on every row when fewer than ``min_rows``.
    """
    K, k = logp.shape[1], logp.shape[2]
    scales, powers = [], []
    for d in range(K):
        rows = ranks[:, d] >= 0
        cond = rows & (ranks[:, :d] == 0).all(axis=1)
        sel = cond if cond.sum() >= min_rows else rows
        x = logp[sel, d].reshape(-1)
        y = (ranks[sel, d, None] == np.arange(k)).reshape(-1)
        ok = np.isfinite(x)
        a, b = _fit_rate(x[ok], y[ok]) if ok.sum() >= min_rows else (0.0, 1.0)
        scales.append(a)
        powers.append(b)
    return Calibration(tuple(scales), tuple(powers))


def _fit_rate(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """argmax over a grid of sum y log q + (1-y) log(1-q), q = min(1, exp(a + b x)); x binned first."""
    edges = np.unique(np.quantile(x, np.linspace(0, 1, 41)))
    bins = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, max(len(edges) - 2, 0))
    n = np.bincount(bins, minlength=len(edges)).astype(np.float64)
    hits = np.bincount(bins, weights=y.astype(np.float64), minlength=len(edges))
    mean_x = np.bincount(bins, weights=x, minlength=len(edges)) / np.maximum(n, 1)
    keep = n > 0
    n, hits, mean_x = n[keep], hits[keep], mean_x[keep]
    a = np.arange(-6.0, 2.0, 0.02)[:, None, None]
    b = np.arange(0.0, 2.5, 0.02)[None, :, None]
    q = np.clip(np.exp(np.minimum(a + b * mean_x, 0.0)), 1e-6, 1 - 1e-6)  # (A, B, bins)
    ll = (hits * np.log(q) + (n - hits) * np.log1p(-q)).sum(-1)
    i, j = np.unravel_index(int(np.argmax(ll)), ll.shape)
    return round(float(a[i, 0, 0]), 4), round(float(b[0, j, 0]), 4)


def step_costs(max_nodes: int, latency: dict | None = None, plain: float | None = None) -> np.ndarray:
    """(max_nodes+1,) a step's cost by the nodes it verifies, relative to a plain step ([0] unused).

    ``latency``: {nodes: seconds} (``measure_latency``'s curve; interpolated, and extended
    linearly past its last size), ``plain``: a plain step's seconds (default latency[1]).
    Without them, 1 + ``COST_SLOPE`` per extra node: a CPU's shape.
    """
    from .growth import latency_table

    n = np.arange(max_nodes + 1, dtype=np.float64)
    if not latency:
        return 1.0 + COST_SLOPE * np.maximum(n - 1, 0)
    table = latency_table({int(k): float(v) for k, v in latency.items()}, max_nodes)
    base = float(plain) if plain else float(table[1])
    if not base > 0:
        raise ValueError(f"a plain step's cost must be positive seconds, got {base}")
    table[1] = base
    return np.maximum(table / base, 1e-9)


@dataclass(frozen=True, eq=False)
class DynamicTree:
    """A dynamic tree plan: the superset a step proposes over, and how ``pick`` sizes the next tree."""

    superset: TreeBuffers
    cost: np.ndarray  # (max_nodes+1,) relative cost of a step by node count ([1]: a plain step)
    calibration: Calibration
    sizes: tuple[int, ...]  # the node counts a step may verify (buckets), 1 first
    _trees: dict = field(default_factory=dict, repr=False)  # subset trees built so far, by their nodes

    @property
    def size(self) -> int:
        """The most nodes a step verifies."""
        return self.sizes[-1]

    @property
    def depth(self) -> int:
        return self.superset.depth

    @property
    def topk(self) -> int:
        return self.superset.topk

    def fixed(self, n: int | None = None) -> "DynamicTree":
        """The same plan with every step's tree ``n`` nodes (default the most): what a fast path that
        must know the next forward's shape before it reads the verdict runs."""
        n = self.size if n is None else n
        return DynamicTree(self.superset, self.cost, self.calibration, (n,))

    def pick(self, scores: np.ndarray) -> tuple[TreeBuffers, np.ndarray]:
        """The next tree from the superset's scores at the node it extends, (S,); returns the tree and its
        nodes as superset nodes (sorted, so the tree's node order is the superset's)."""
        S = self.superset.size
        order = np.lexsort((np.arange(S), -scores))  # best first; ties: the shallower, then the smaller ranks
        expected = np.concatenate([[1.0], 1.0 + np.cumsum(np.exp(scores[order[1:]].astype(np.float64)))])
        sizes = np.array(self.sizes)
        n = int(sizes[np.argmax(expected[sizes - 1] / self.cost[sizes])])  # ties: the smaller tree
        select = np.sort(order[:n])
        return self.subtree(select), select

    def subtree(self, select: np.ndarray) -> TreeBuffers:
        """The tree of superset nodes ``select`` (sorted, ancestor-closed), built once per node set."""
        key = np.asarray(select, dtype=np.int64).tobytes()
        tree = self._trees.get(key)
        if tree is None:
            if len(self._trees) > 4096:  # a long run meets few node sets; bound the memo anyway
                self._trees.clear()
            choices = [list(self.superset.choices[i - 1]) for i in select[1:]]
            tree = self._trees[key] = build_tree(choices) if choices else ROOT_ONLY
        return tree


def make_dynamic(max_nodes: int, depth: int, topk: int, cost: np.ndarray | None = None,
                 calibration: Calibration | None = None) -> DynamicTree:
    """A dynamic plan of at most ``max_nodes`` nodes over heads giving ``depth`` guesses of ``topk`` ranks."""
    topk = min(topk, TOPK)
    paths = superset_paths(max_nodes, depth, topk)
    most = min(max_nodes, len(paths) + 1)  # shallow heads with few ranks may not fill max_nodes
    sizes = tuple(n for n in BUCKETS if n < most) + (most,)
    cost = step_costs(max_nodes) if cost is None else np.asarray(cost, dtype=np.float64)
    if len(cost) < max_nodes + 1:
        raise ValueError(f"step costs cover {len(cost) - 1} nodes; a dynamic:{max_nodes} tree needs {max_nodes}")
    return DynamicTree(build_tree([list(p) for p in paths], max_nodes=len(paths) + 1),
                       cost, calibration or Calibration.identity(depth), sizes)


def plan_costs(facts: dict, max_nodes: int) -> np.ndarray:
    """A dynamic plan's step costs from a tuned tree file's facts: its latency curve relative to its
    plain step, plus a ring's transport per pass (``pass_overhead_ms``), which every step pays alike.
    Measured on another machine, the curve is still the model's shape of cost (relative to a plain
    step), the best prior at hand; ``mlx_medusa tune`` measures this one. None: ``step_costs``' default.
    (A commit that gathers nodes out of place costs extra; the curve leaves it out.)
    """
    curve, plain = facts.get("latency_curve"), facts.get("plain_step")
    if not isinstance(curve, dict) or not curve:
        return step_costs(max_nodes)
    extra = float(facts.get("pass_overhead_ms") or 0.0) / 1e3
    curve = {k: float(v) + extra for k, v in curve.items()}
    return step_costs(max_nodes, curve, float(plain) + extra if plain else None)
