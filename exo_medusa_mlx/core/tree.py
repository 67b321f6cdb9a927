"""Medusa candidate trees, framework-neutral (numpy), shared by both backends.

A tree is given as ``choices``: a list of paths, each a list of top-k ranks, one
per depth. ``[0, 1]`` is "head 0's best guess, then head 1's second guess".
Node 0 is the root (the base model's own next token); node k is path k-1 after
sorting by (length, lexicographic).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from .limits import MAX_TREE_NODES, MAX_TREE_RANK, LimitError

MAX_TREE_FILE_BYTES = 1 << 20  # tuned trees carry their measurements too; still a few kB
# The flat candidate vector is [root, head0 top-k, head1 top-k, ...].
DEFAULT_TREE = "cpu-8"

# Small trees for CPUs, where verifying N tokens costs nearly N/2 single steps.
_CPU_TREES: dict[str, list[list[int]]] = {
    "cpu-4": [[0], [1], [0, 0]],
    "cpu-6": [[0], [1], [0, 0], [0, 1], [0, 0, 0]],
    "cpu-8": [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]],
    "cpu-12": [[0], [1], [2], [3], [0, 0], [0, 1], [0, 2], [1, 0],
               [0, 0, 0], [0, 0, 1], [0, 0, 0, 0]],
    "cpu-16": [[0], [1], [2], [3], [0, 0], [0, 1], [0, 2], [1, 0], [1, 1],
               [2, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 0, 0],
               [0, 0, 0, 1]],
}


@dataclass(frozen=True)
class TreeBuffers:
    """Everything a verification step needs about one tree, computed once.

    T nodes, P root-to-leaf paths, D the deepest path's depth.
    """

    choices: tuple[tuple[int, ...], ...]  # sorted paths, node k = choices[k-1]
    topk: int  # candidates taken from each head
    depth: int  # D: deepest node, also the number of heads the tree needs
    parents: np.ndarray  # (T,) int, root -1
    depths: np.ndarray  # (T,) int, root 0
    mask: np.ndarray  # (T, T) bool: node i sees node j (itself, ancestors)
    tree_indices: np.ndarray  # (T,) int into [root, head0 top-k, head1 top-k, ...]
    retrieve_indices: np.ndarray  # (P, D+1) node ids along each path, -1 padded
    children: tuple[tuple[int, ...], ...]  # per node, children ordered by rank

    @property
    def size(self) -> int:
        return len(self.parents)

    @property
    def is_chain(self) -> bool:
        """True when the tree is a single path (node i is at depth i)."""
        return bool(np.array_equal(self.depths, np.arange(self.size)))

    def to_json(self) -> dict:
        return {"choices": [list(c) for c in self.choices], "topk": self.topk}


def _short(v, limit: int = 80) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _validate(choices, num_heads: int | None, topk: int | None, max_nodes: int) -> list[tuple[int, ...]]:
    if not isinstance(choices, (list, tuple)):
        raise ValueError(f"tree choices must be a list of paths, got {type(choices).__name__}")
    if len(choices) + 1 > max_nodes:  # before anything costs time in the size of the tree
        raise LimitError(f"tree has {len(choices) + 1} nodes, more than the limit of {max_nodes}: use a smaller tree")
    paths = []
    for c in choices:
        if not isinstance(c, (list, tuple)) or len(c) == 0:
            raise ValueError(f"tree path {_short(c)} is empty or not a list; each path is a non-empty list of "
                             "top-k ranks")
        if len(c) > max_nodes - 1:
            raise LimitError(f"tree path of {len(c)} ranks is deeper than a {max_nodes}-node tree can be")
        if not all(isinstance(r, (int, np.integer)) and not isinstance(r, bool) and 0 <= r < MAX_TREE_RANK
                   for r in c):
            raise ValueError(f"tree path {_short(c)} must hold non-negative integer ranks below {MAX_TREE_RANK}")
        paths.append(tuple(int(r) for r in c))
    seen = set(paths)
    if len(seen) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise ValueError(f"tree path {list(dup)} appears twice")
    for p in paths:
        if len(p) > 1 and p[:-1] not in seen:
            raise ValueError(f"tree path {list(p)} has no parent {list(p[:-1])}; add the parent path")
        if num_heads is not None and len(p) > num_heads:
            raise ValueError(f"tree path {list(p)} is {len(p)} deep but the model has {num_heads} Medusa heads; use a shallower tree")
        if topk is not None and max(p) >= topk:
            raise ValueError(f"tree path {list(p)} uses rank {max(p)} but top-k is {topk}")
    return sorted(paths, key=lambda p: (len(p), p))


def build_tree(
    choices: Sequence[Sequence[int]],
    num_heads: int | None = None,
    topk: int | None = None,
    max_nodes: int = MAX_TREE_NODES,
) -> TreeBuffers:
    """Build the tree buffers for ``choices``.

    Args:
        choices: paths of top-k ranks; ``[]`` gives the root alone (plain decoding).
        num_heads: if given, reject paths deeper than the heads can guess.
        topk: candidates per head; defaults to the largest rank used plus one.
        max_nodes: the largest tree accepted, root included (``LimitError`` beyond).
    """
    paths = _validate(choices, num_heads, topk, max_nodes)
    if topk is None:
        topk = max((max(p) for p in paths), default=0) + 1
    T = len(paths) + 1
    node_of = {(): 0}
    for k, p in enumerate(paths):
        node_of[p] = k + 1

    parents = np.full(T, -1, dtype=np.int64)
    depths = np.zeros(T, dtype=np.int64)
    tree_indices = np.zeros(T, dtype=np.int64)
    children: list[list[int]] = [[] for _ in range(T)]
    for p in paths:
        k = node_of[p]
        parents[k] = node_of[p[:-1]]
        depths[k] = len(p)
        tree_indices[k] = 1 + topk * (len(p) - 1) + p[-1]
        children[parents[k]].append(k)

    mask = np.zeros((T, T), dtype=bool)
    for k in range(T):
        j = k
        while j >= 0:
            mask[k, j] = True
            j = parents[j]

    is_parent = np.zeros(T, dtype=bool)
    is_parent[parents[parents >= 0]] = True
    leaves = [k for k in range(T) if not is_parent[k]]
    D = int(depths.max())
    retrieve = np.full((len(leaves), D + 1), -1, dtype=np.int64)
    for row, leaf in enumerate(leaves):
        chain = []
        j = leaf
        while j >= 0:
            chain.append(j)
            j = parents[j]
        retrieve[row, : len(chain)] = chain[::-1]

    kids = tuple(tuple(sorted(c, key=lambda k: paths[k - 1][-1])) for c in children)
    return TreeBuffers(
        choices=tuple(paths), topk=topk, depth=D, parents=parents, depths=depths,
        mask=mask, tree_indices=tree_indices, retrieve_indices=retrieve, children=kids,
    )


ROOT_ONLY = build_tree([])  # plain decoding: every step verifies the root alone


def chain(n: int) -> list[list[int]]:
    """The chain tree of ``n`` guesses: each head's top-1 after the previous."""
    return [[0] * d for d in range(1, n + 1)]


def preset_names() -> list[str]:
    return sorted(["mc_sim_7b_63", "chain-N", *_CPU_TREES])


def tree_choices(spec: str | Sequence[Sequence[int]]) -> list[list[int]]:
    """Resolve a preset name, ``chain-N``, a JSON file path or a list to choices."""
    if isinstance(spec, Path):
        return load_tree_file(spec)
    if not isinstance(spec, str):
        return [list(c) for c in spec]
    if spec in _CPU_TREES:
        return [list(c) for c in _CPU_TREES[spec]]
    if spec.startswith("chain-"):
        n = spec.removeprefix("chain-")
        if not n.isdigit():
            raise ValueError(f"tree '{spec}': chain trees are named chain-N with N a number, e.g. chain-3")
        return chain(int(n))
    if spec == "mc_sim_7b_63":
        text = resources.files("exo_medusa_mlx").joinpath("trees/mc_sim_7b_63.json").read_text()
        return json.loads(text)["choices"]
    path = Path(spec)
    if path.suffix == ".json" or path.exists():
        return load_tree_file(path)
    raise ValueError(f"unknown tree '{spec}': use one of {', '.join(preset_names())} or a JSON file")


def load_tree_file(path: str | Path) -> list[list[int]]:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"tree file {path} is a folder: pass a tree JSON file")
    if not path.is_file():
        raise FileNotFoundError(f"tree file {path} not found")
    if path.stat().st_size > MAX_TREE_FILE_BYTES:
        raise LimitError(f"tree file {path} has {path.stat().st_size} bytes; a tree of at most {MAX_TREE_NODES} "
                         "nodes fits in far fewer: is it the right file?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"tree file {path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"tree file {path} is nested too deeply: a tree is a list of paths of ranks") from None
    choices = data.get("choices") if isinstance(data, dict) else data
    if choices is None:
        raise ValueError(f"tree file {path} has no 'choices' list")
    return choices


def save_tree(path: str | Path, choices: Sequence[Sequence[int]], **info) -> None:
    """Write a tree JSON (``choices`` plus any facts worth keeping, e.g. predictions)."""
    tree = build_tree(choices)
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(json.dumps({**info, **tree.to_json(), "nodes": tree.size}, indent=1))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load_tree(spec: str | Sequence[Sequence[int]] | TreeBuffers) -> TreeBuffers:
    """Resolve ``spec`` (preset, file, choices or buffers) and build its buffers.

    Whether the heads can fill the tree is the model's check (``MedusaBase.check_tree``).
    """
    return spec if isinstance(spec, TreeBuffers) else build_tree(tree_choices(spec))
