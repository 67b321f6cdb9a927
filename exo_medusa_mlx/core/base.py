"""What both backends' ``MedusaModel`` and ``MedusaHeads`` share, over a few array primitives.

A backend subclasses ``MedusaBase`` and ``HeadsBase`` and gives them ``ops`` (an
``ArrayOps``: stack, concat, argmax, top-k, scatter, to-numpy) plus the model
primitives the base cannot know: ``hidden`` (the base model's layers over the
cache), ``logits``, ``embed``, ``draft_rows``, ``make_cache``, ``make_batch_cache``, ``transposes`` and,
for heads, ``named_arrays`` / ``assign``. Everything else, proposing, the heads'
projection and the checkpoint key mapping, is written here once.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from .dynamic import Calibration, DynamicTree, best_choices, best_nodes, dynamic_nodes, make_dynamic, plan_costs
from .heads_format import DRAFT_KEY, module_keys, read_heads, resolve_config, write_heads
from .step import Verifier
from .tree import ROOT_ONLY, TreeBuffers, load_tree


class ArrayOps(Protocol):
    """The array functions the neutral code needs; each backend gives one (``array_ops.py``)."""

    def stack(self, xs: list, axis: int = 0) -> Any: ...
    def concat(self, xs: list, axis: int = 0) -> Any: ...
    def take(self, a, idx: np.ndarray) -> Any: ...  # a[..., idx]: the last axis gathered
    def argmax(self, a) -> Any: ...  # over the last axis
    def topk(self, a, k: int) -> Any: ...  # indices of the k largest over the last axis, best first
    def top_logprobs(self, a, k: int) -> tuple: ...  # topk's indices and the log-softmax of ``a`` there
    def scatter_vocab(self, sub, ids, vocab_size: int) -> Any: ...  # (..., V') -> (..., V), -inf elsewhere
    def numpy(self, *arrays) -> tuple: ...  # evaluated together; None stays None


@contextmanager
def swapped_class(modules: list, cls: type | None):
    """Run with every module in ``modules`` of class ``cls`` (None: unchanged), then restore.

    How a per-call choice reaches modules inside a model we do not own (the
    transposed product in mlx-lm's or transformers' linears) without leaving the
    model changed between calls.
    """
    if cls is None or not modules:
        yield
        return
    before = [type(m) for m in modules]
    for m in modules:
        m.__class__ = cls
    try:
        yield
    finally:
        for m, c in zip(modules, before):
            m.__class__ = c


@dataclass
class MedusaBase:
    """A base model with Medusa heads and a tree (static, or a dynamic plan); ``heads`` None means plain
    decoding.

    Subclasses set up their backend in ``__post_init__``, then call ``super().__post_init__()``.
    """

    base: Any  # the backend's own model (mlx-lm's, transformers')
    heads: Any = None  # the backend's MedusaHeads
    tree: TreeBuffers | DynamicTree = field(default=ROOT_ONLY)  # or a spec, resolved by ``plan``
    model_id: str | None = None
    rows_product: bool = True  # verification forwards may multiply the transposed way (``transposes``)
    facts: dict = field(default_factory=dict)  # the heads' tuned tree file (``tuned_facts``): costs, calibration

    ops: ClassVar[ArrayOps]
    verify_rows_max: ClassVar[int] = 64  # beyond this many rows, both products cost about the same
    backend: ClassVar[str]  # "mlx" or "torch": which tuned tree file a load reads (``default_tree_for``)
    probes_at_load: ClassVar[bool] = False  # whether a load with no tree tuned here probes (``core.attach``)

    @classmethod
    def heads_for(cls, base, path: Path):
        """The backend's heads from ``path`` for ``base``, in its compute dtype and on its device."""
        raise NotImplementedError

    def __post_init__(self) -> None:
        self._draft = None
        if not isinstance(self.tree, (TreeBuffers, DynamicTree)):
            self.tree = self.plan(self.tree)  # a spec: ``dynamic[:N]`` needs the heads to build
        self.check_tree(self.tree)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size  # ``config``: the base model's (mlx-lm's args, transformers' config)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def max_context(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None)

    @property
    def eos_token_ids(self) -> list[int]:
        """End tokens the model's own config names, for a tokenizer that lists none (``core.tokens.eos_ids``)."""
        return []

    # ------------------------------------------------------------ trees

    def check_tree(self, tree: TreeBuffers | DynamicTree) -> TreeBuffers | DynamicTree:
        """``tree``, if these heads can fill it; a one-line error otherwise."""
        if tree.size == 1:
            return tree
        if isinstance(tree, DynamicTree) and self.heads is not None and self.heads.config.hydra:
            raise ValueError("dynamic trees need heads whose guesses do not depend on the path, and these are "
                             "hydra heads: use a static --tree")
        if self.heads is None:
            raise ValueError(f"a {tree.size}-node tree needs Medusa heads, and this model has none: "
                             "pass --heads, or decode plainly (--no-medusa)")
        if tree.depth > self.heads.num_heads:
            raise ValueError(f"tree is {tree.depth} deep but the heads give {self.heads.num_heads} guesses; "
                             "use a shallower tree")
        if tree.topk > self.heads.config.candidates:
            raise ValueError(f"tree asks for the heads' rank-{tree.topk - 1} guess but they choose among "
                             f"{self.heads.config.candidates} tokens: use smaller ranks in the tree")
        return tree

    def with_tree(self, tree) -> "MedusaBase":
        """The same model and heads with another tree (preset, file, choices, buffers, ``dynamic[:N]``
        or a dynamic plan)."""
        out = replace(self, tree=tree if isinstance(tree, DynamicTree) else self.plan(tree))
        out._draft = self._draft
        return out

    def plan(self, spec) -> TreeBuffers | DynamicTree:
        """The tree ``spec`` names, for these heads: ``dynamic[:N]`` builds a dynamic plan from the heads'
        tuned facts (calibration; step costs, this machine's where tuned here), ``best:N`` the static
        tree of N nodes that accepts the most (``best_choices``)."""
        n, best = dynamic_nodes(spec), best_nodes(spec)
        if best is not None:
            return load_tree(best_choices(self.facts, best)) if self.heads is not None else ROOT_ONLY
        if n is None:
            return load_tree(spec)
        if self.heads is None:
            return ROOT_ONLY
        depth, topk = self.heads.num_heads, self.heads.config.candidates
        cost = plan_costs(self.facts, n)
        calibration = Calibration.from_json(self.facts.get("calibration"), depth)
        return self.check_tree(make_dynamic(n, depth, topk, cost, calibration))

    # ------------------------------------------------------------ forward

    def forward(self, ctx, caches, tokens, tree: TreeBuffers | None = None):
        """Run ``tokens`` (T,) laid out as ``tree`` (contiguous if None) over the cache.

        Returns the normed hidden states, (T, H). The caller commits the kept
        tokens with ``ctx.commit``. A tree forward of a few tokens multiplies the
        transposed way where that is faster (``transposes``).
        """
        T = len(tokens)
        if tree is None:
            ctx.begin(n=T)
        else:
            ctx.begin(tree.depths, tree.mask)
        return self.hidden(tokens, caches, transposed=tree is not None and self.transposes(T))

    def fast_verifier(self, ctx, caches, tree: TreeBuffers, policy, fast_path: bool | None = None) -> Verifier | None:
        """A backend's single-sequence fast path where it pays (``fast_path`` None), or as asked;
        None: the step's own (``BatchVerifier``, a batch of one)."""
        if fast_path:
            raise ValueError(f"{type(self).__name__} has no fast path: leave fast_path unset")
        return None

    def settle(self, caches) -> None:
        """After a prefill chunk is committed (MLX evaluates, to bound the graph)."""

    def argmax(self, a):
        return self.ops.argmax(a)

    def to_numpy(self, *arrays) -> tuple:
        return self.ops.numpy(*arrays)

    # ------------------------------------------------------------ heads

    def project(self, h, depth: int | None = None):
        """(1+D, ..., V): base logits then those of the first ``depth`` heads (all if
        None), in one matmul (shared layout). Next-token heads first need the base
        model's argmax at ``h``: two passes over lm_head."""
        if self.heads is None:
            return self.logits(h)[None]
        draft = self.draft()
        if not self.heads.config.next_token:
            return self.heads.project(h, self.lm_head, num=depth, draft=draft)
        logits = self.logits(h)
        rows = self.heads.project(h, self.lm_head, base=False, num=depth, next_embeds=self._next_embeds(logits),
                                  draft=draft)
        return self.ops.concat([logits[None], rows])

    def _next_embeds(self, logits):
        """Embeddings of the base model's argmax, for next-token heads (else None)."""
        if not self.heads.config.next_token:
            return None
        return self.embed(self.ops.argmax(logits))

    def propose(self, h, depth: int | None, k: int, logprobs: bool = False):
        """What a decoding step needs at ``h`` (..., H): the base logits (..., V) and
        the first ``depth`` heads' top-``k`` guesses (D, ..., k), best first; with
        ``logprobs``, also the heads' log-probabilities of those guesses (D, ..., k).

        The guesses equal ``topk(project(h, depth)[1:], k)`` but, with a draft
        vocabulary, the heads' full rows are never built: the top-k is taken over
        the draft's scores and mapped to token ids (the probabilities are then the
        heads' over the draft).
        """
        draft = self.draft()  # None without heads
        if draft is None:
            rows = self.project(h, depth)
            logits, scores, ids = rows[0], rows[1:], None
        else:
            ids, w = draft
            logits = self.logits(h)
            scores = self.ops.stack(self.heads.states(h, depth, self._next_embeds(logits))) @ w.T  # (D, ..., V')
        if not logprobs:
            top = self.ops.topk(scores, k)
            return logits, top if ids is None else ids[top]
        top, lp = self.ops.top_logprobs(scores, k)
        return logits, top if ids is None else ids[top], lp

    def propose_scored(self, h, plan: DynamicTree):
        """``propose_tree`` over a dynamic plan's superset, with each node's score: the log of the
        product of its path's calibrated head probabilities. Returns (..., V), (..., S), (..., S)."""
        tree, cal = plan.superset, plan.calibration
        logits, guesses, lp = self.propose(h, tree.depth, tree.topk, logprobs=True)  # (D, ..., k) each
        root = self.ops.argmax(logits)[..., None]
        lq = [cal.log_rate(lp[d], d) for d in range(tree.depth)]
        flat = self.ops.concat([root] + [guesses[d] for d in range(tree.depth)], axis=-1)  # (..., 1+D*k)
        own = self.ops.take(self.ops.concat([lq[0][..., :1] * 0] + lq, axis=-1), tree.tree_indices)  # (..., S)
        parents = np.maximum(tree.parents, 0)  # the root's own score is 0: it may add itself
        score = own
        for _ in range(tree.depth):  # after d rounds every node of depth <= d holds its path's sum
            score = own + self.ops.take(score, parents)
        return logits, self.ops.take(flat, tree.tree_indices), score

    def propose_tree(self, h, tree: TreeBuffers):
        """What a verification step needs at ``h`` (..., H): the base logits (..., V) and, per row,
        the next tree's tokens (..., T) with the row's argmax as its root.

        Independent heads' guesses are laid out by ``tree.tree_indices`` (the one lay-out);
        hydra heads guess depth by depth, each node's children from the path to it.
        """
        if self.heads is not None and self.heads.config.hydra:
            return self._hydra_tree(h, tree)
        logits, guesses = self.propose(h, tree.depth, tree.topk)  # (..., V), (D, ..., k)
        root = self.ops.argmax(logits)[..., None]
        flat = self.ops.concat([root] + [guesses[d] for d in range(guesses.shape[0])], axis=-1)  # (..., 1+D*k)
        return logits, self.ops.take(flat, tree.tree_indices)

    def _hydra_tree(self, h, tree: TreeBuffers):
        logits = self.logits(h)
        toks = self.ops.argmax(logits)[..., None]  # (..., 1): node 0, the root
        for d in range(tree.depth):  # nodes are sorted by depth: depth d+1's follow those found so far
            kids = np.flatnonzero(tree.depths == d + 1)
            parents = np.unique(tree.parents[kids])  # the depth-d nodes with children
            path = ancestors(tree, parents)  # (P, d+1): root .. parent
            embeds = [self.embed(self.ops.take(toks, path[:, j])) for j in range(d + 1)]  # each (..., P, H)
            states = self.heads.heads[d](h[..., None, :], embeds)  # (..., P, H)
            ranks = np.array([tree.choices[c - 1][-1] for c in kids])
            k = int(ranks.max()) + 1
            top = self._top_tokens(states, d, k)  # (..., P, k)
            slot = np.searchsorted(parents, tree.parents[kids]) * k + ranks
            toks = self.ops.concat([toks, self.ops.take(top.reshape(*top.shape[:-2], -1), slot)], axis=-1)
        return logits, toks

    def _top_tokens(self, states, d: int, k: int):
        """The k best token ids of head ``d`` at ``states`` (..., H), best first: (..., k)."""
        draft = self.draft()
        if draft is not None:
            ids, w = draft
            return ids[self.ops.topk(states @ w.T, k)]
        lm_head = self.heads.heads[d].lm_head if self.heads.config.own_lm_head else self.logits
        return self.ops.topk(lm_head(states), k)

    def draft(self):
        """The heads' draft vocabulary and its lm_head rows (built on first use), or None."""
        if self.heads is None or self.heads.draft_vocab is None:
            return None
        if self._draft is None:
            self._draft = self.draft_rows(self.heads.draft_vocab)
        return self._draft


def ancestors(tree: TreeBuffers, nodes: np.ndarray) -> np.ndarray:
    """(len(nodes), d+1) node ids from the root down to each of ``nodes`` (all at depth d)."""
    out = [np.asarray(nodes)]
    while (out[-1] > 0).any():
        out.append(tree.parents[out[-1]])
    return np.stack(out[::-1], axis=1)


def head_state(x, next_token, path: list, blocks: list, embeds: list | None):
    """One head's hidden state at ``x`` (..., H), either backend's modules: the root's embedding
    through ``next_token`` (None: not that layout) and the path's through ``path`` (hydra;
    ``embeds`` root first) added, then the blocks."""
    if next_token is not None:
        x = x + next_token(embeds[0])
    for lin, e in zip(path, embeds or []):
        x = x + lin(e)
    for b in blocks:
        x = b(x)
    return x


class HeadsBase:
    """K heads over the base model's last (normed) hidden state; head i guesses the
    token at t+2+i (the base lm_head gives t+1). Subclasses hold ``config``,
    ``heads`` (modules with ``blocks``, optional ``next_token`` and ``lm_head``) and
    ``draft_vocab`` (token ids the guesses are scored over, or None)."""

    ops: ClassVar[ArrayOps]

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def states(self, h, num: int | None = None, next_embeds=None, path_embeds: list | None = None) -> list:
        """The first ``num`` heads' hidden states at ``h`` (before any lm_head), each (..., H).

        ``path_embeds``: embeddings of the root (the base model's next token) and of the
        tokens after it, each (..., H): head d reads the first d+1 (hydra), the root
        alone (next-token; or give it as ``next_embeds``) or none. Training feeds the true
        tokens (teacher forcing): on an accepted path they are the guesses.
        """
        heads = list(self.heads)[:num]
        if self.config.hydra:
            if path_embeds is None:
                raise ValueError("hydra heads read the tokens of the path they extend: pass path_embeds")
            return [head(h, path_embeds[: d + 1]) for d, head in enumerate(heads)]
        if next_embeds is None and path_embeds is not None:
            next_embeds = path_embeds[0]
        if self.config.next_token and next_embeds is None:
            raise ValueError("these heads read the base model's next token: pass next_embeds")
        embeds = [next_embeds] if self.config.next_token else None
        return [head(h, embeds) for head in heads]

    def project(self, h, lm_head, base: bool = True, num: int | None = None, next_embeds=None, draft=None,
                path_embeds: list | None = None):
        """Logits of the base head and every Medusa head at ``h``.

        h: (..., H). Returns (1+K, ..., V): row 0 the base model's, row 1+i head i's
        (without ``base``: (K, ..., V), the heads' alone). ``num``: only the first
        ``num`` heads (a tree ``num`` deep reads no others). With the shared layout,
        all hidden states go through ``lm_head`` in one matmul. ``next_embeds``
        (..., H): embeddings of the base model's next token at ``h``, which
        next-token heads need (``path_embeds``: the path's, for hydra heads; see
        ``states``). ``draft``: (ids, lm_head rows of those ids), to
        score the guesses over the draft vocabulary alone (the other logits are
        -inf); a second, smaller pass.
        """
        heads = list(self.heads)[:num]
        hs = self.states(h, num, next_embeds, path_embeds)
        if draft is not None:
            ids, w = draft
            rows = self.ops.scatter_vocab(self.ops.stack(hs) @ w.T, ids, self.config.vocab_size)
        elif not self.config.own_lm_head:
            return lm_head(self.ops.stack([h] + hs if base else hs))
        else:
            rows = self.ops.stack([head.lm_head(x) for head, x in zip(heads, hs)])
        return self.ops.concat([lm_head(h)[None], rows]) if base else rows

    # ------------------------------------------------------------ checkpoints

    def reference_weights(self) -> dict[str, np.ndarray]:
        """Weights under the reference key layout (float32 numpy)."""
        arrays = self.named_arrays()
        out = {ref: arrays[name] for ref, name in module_keys(self.config).items()}
        if self.draft_vocab is not None:
            out[DRAFT_KEY] = self.draft_vocab
        return out

    @classmethod
    def read(cls, path: str | Path, hidden_size: int, vocab_size: int):
        """Heads from a folder or a ``medusa_lm_head.{safetensors,pt}`` file, as the file holds
        them: the head count and layout come from the keys; shapes are checked against the
        base model's ``hidden_size`` and ``vocab_size``."""
        weights, raw, file = read_heads(path)
        heads = cls(resolve_config(weights, raw, str(file), hidden_size, vocab_size))
        heads.load_reference_weights(weights)
        return heads

    def load_reference_weights(self, weights: dict[str, np.ndarray]) -> None:
        self.assign({name: weights[ref] for ref, name in module_keys(self.config).items()})
        self.draft_vocab = np.asarray(weights[DRAFT_KEY]) if DRAFT_KEY in weights else None

    def save(self, folder: str | Path) -> Path:
        return write_heads(folder, self.reference_weights(), self.config)
