"""The Medusa step, written once for every caller: verify, accept, commit, propose.

A step verifies the tree in one forward (the base model's verdict at every node
and, at every node, the next tree the heads propose from it), accepts the longest
agreeing path, commits it, and takes the next tree from the last accepted node. Plain decoding is the
root-only tree. Both backends' ``generate_step``, the batch generator, the exo engines' last shard and
``tune``'s latency probe run this module; a backend supplies the model's array
primitives (``forward``, ``propose``, ``logits``, ``to_numpy``...) and may
override the ``Verifier`` with a fast path (MLX's lookahead, CUDA graphs).

``batch_step`` is the step for B sequences (``Sequence``), each with its own tree,
policy and cache offset: one verification forward over all their trees
(``BatchVerifier``), acceptance per sequence, one commit advancing each by its own
count. One sequence is B = 1 of it: ``generate_step`` runs it over a one-row batch,
or over a backend's single-sequence fast path.
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
    drafts: np.ndarray | None  # (T, T') each node's next tree, its root the node's argmax; None: root alone


def advance(policy: Policy, tree: TreeBuffers, tokens: np.ndarray, v: Verified) -> tuple[Acceptance, np.ndarray]:
    """Accept from a verified ``tree`` and take the next tree from the last kept node, its
    root the bonus token. After a prefill the verified tree is ``ROOT_ONLY``: the prompt's
    last position, whose verdict gives the first token.

    Returns the acceptance (nodes to commit, tokens to emit) and the next tree's tokens (T',) int64.
    """
    acc = policy.accept(tree, tokens, v.verdict)
    if v.drafts is None:
        return acc, np.array(acc.tokens[-1:], dtype=np.int64)
    nxt = v.drafts[int(acc.nodes[-1])].astype(np.int64)
    nxt[0] = acc.tokens[-1]  # sampling may pick another root; its children stay valid candidates
    return acc, nxt


def read(model, h, tree: TreeBuffers, logits: bool) -> Verified:
    """The verdict and the next tree's tokens at hidden states ``h`` (T, H) (``propose_tree``).

    ``logits``: the policy samples, so the verdict is the logits, not their argmax.
    ``tree``: the tree the next step verifies (only the heads it reads are run).
    """
    return Verified(*model.to_numpy(*read_arrays(model, h, tree, logits)))


def read_arrays(model, h, tree: TreeBuffers, logits: bool) -> tuple:
    """``read`` before the copy to the host: the backend's arrays (what a CUDA graph returns)."""
    if tree.size > 1:
        out, drafts = model.propose_tree(h, tree)  # (T, V), (T, T')
    else:
        out, drafts = model.logits(h), None
    return out if logits else model.argmax(out), drafts


@dataclass(eq=False)
class Sequence:
    """One sequence's decoding state between steps."""

    slots: object  # its ``SlotMap`` (its row of a batch cache): committed count, window
    policy: Policy
    tree: TreeBuffers  # the tree ``tokens`` are laid out on: the next step verifies it
    tokens: np.ndarray  # (tree.size,) int64
    # The tree the next step proposes; a scheduler may set it per step (smaller as the batch fills).
    next_tree: TreeBuffers | None = None  # None: ``tree`` again

    def __post_init__(self):
        if self.next_tree is None:
            self.next_tree = self.tree


class Verifier:
    """One sequence's verification forward per step over its own cache; a backend's fast path
    (MLX's lookahead, the torch static step) overrides it. ``batch_step`` runs it as a batch of one."""

    def __init__(self, model, ctx, caches, tree: TreeBuffers, policy: Policy):
        self.model, self.ctx, self.caches, self.tree, self.policy = model, ctx, caches, tree, policy

    def verify(self, tokens: np.ndarray) -> Verified:
        h = self.model.forward(self.ctx, self.caches, tokens, self.tree)  # (T, H)
        return read(self.model, h, self.tree, self.policy.needs_logits)

    def commit(self, nodes: np.ndarray) -> None:
        self.ctx.commit(self.caches, nodes)

    def verify_batch(self, seqs: list[Sequence]) -> list[Verified]:
        (seq,) = seqs  # one sequence, its tree fixed
        return [self.verify(seq.tokens)]

    def commit_batch(self, nodes: list[np.ndarray]) -> None:
        (one,) = nodes
        self.commit(one)


class BatchVerifier:
    """One verification forward over every row's tree, padded to one T, over a batch cache.

    Sequences join after their prefill (``join``: their single-sequence cache becomes a row)
    and leave between steps; ``seqs`` is in row order. Rows are read in groups that share
    the tree they verified and the one they propose; one row runs the single-sequence shapes.
    """

    def __init__(self, model):
        self.model = model
        self.ctx, self.caches = model.make_batch_cache()
        self.seqs: list[Sequence] = []

    def join(self, seq: Sequence, ctx, caches) -> None:
        """Add ``seq`` as the last row; ``ctx``, ``caches``: its prefilled single-sequence cache."""
        self.ctx.join(self.caches, ctx, caches)
        self.seqs.append(seq)

    def leave(self, gone: list[Sequence]) -> None:
        keep = [i for i, s in enumerate(self.seqs) if s not in gone]
        self.ctx.leave(self.caches, keep)
        self.seqs = [self.seqs[i] for i in keep]

    def verify_batch(self, seqs: list[Sequence]) -> list[Verified]:
        if seqs != self.seqs:
            raise ValueError("a batch verifies its own rows, in row order: pass its seqs")
        B, T = len(seqs), max(s.tree.size for s in seqs)
        tokens = np.zeros((B, T), dtype=np.int64)  # padding nodes: token 0, never read
        for b, s in enumerate(seqs):
            tokens[b, : s.tree.size] = s.tokens
        self.ctx.begin([s.tree for s in seqs])
        transposed = T > 1 and self.model.transposes(B * T)
        h = self.model.hidden(tokens[0] if B == 1 else tokens, self.caches, transposed)
        return self._read(h if B > 1 else h[None], seqs)  # h: (B, T, H)

    def _read(self, h, seqs: list[Sequence]) -> list[Verified]:
        groups: dict[tuple, list[int]] = {}
        for b, s in enumerate(seqs):
            groups.setdefault((s.tree.size, id(s.next_tree), s.policy.needs_logits), []).append(b)
        arrays = []
        for (T, _, logits), rows in groups.items():
            if len(rows) == 1:
                rows_h = h[rows[0], :T]  # (T, H): one row reads as a single sequence does
            elif len(rows) == h.shape[0]:
                rows_h = h[:, :T]
            else:
                rows_h = self.model.ops.stack([h[b, :T] for b in rows])
            arrays += read_arrays(self.model, rows_h, seqs[rows[0]].next_tree, logits)
        host = self.model.to_numpy(*arrays)  # one wait for every row's verdict
        out: list[Verified | None] = [None] * len(seqs)
        for g, rows in enumerate(groups.values()):
            verdict, drafts = host[2 * g], host[2 * g + 1]
            for i, b in enumerate(rows):
                out[b] = Verified(verdict, drafts) if len(rows) == 1 else \
                    Verified(verdict[i], None if drafts is None else drafts[i])
        return out

    def commit_batch(self, nodes: list[np.ndarray]) -> None:
        self.ctx.commit(self.caches, nodes)


def batch_step(verifier, seqs: list[Sequence]) -> list[Acceptance]:
    """One Medusa step for every sequence: one verification, acceptance per sequence (each with
    its own policy), one commit advancing each by its own count. Each sequence's next tree is
    its ``next_tree``, laid out from its last kept node. Returns the acceptances, in order."""
    verified = verifier.verify_batch(seqs)
    accs = []
    for s, v in zip(seqs, verified):
        acc, s.tokens = advance(s.policy, s.tree, s.tokens, v)
        s.tree = s.next_tree
        accs.append(acc)
    verifier.commit_batch([a.nodes for a in accs])
    return accs


def prefill(model, ctx, caches, prompt: np.ndarray, step: int = PREFILL_STEP, check=None):
    """Commit the prompt in chunks; returns the last position's hidden state, (H,).

    ``check()`` runs before each chunk and raises to stop (``limits.CancelToken.check``)."""
    prompt = np.asarray(prompt, dtype=np.int64).reshape(-1)
    if len(prompt) == 0:
        raise ValueError("prompt is empty: give at least one token")
    outs = run_committed(ctx, caches, len(prompt), lambda s, e: model.hidden(prompt[s:e], caches),
                         lambda h: model.settle(caches), step, check)
    return outs[-1][-1]


def start(model, ctx, h, policy: Policy, tree: TreeBuffers) -> tuple[Sequence, list[int]]:
    """After a prefill: the first token, the acceptance of the root-only tree at the prompt's
    last hidden state ``h`` (H,), and the sequence ready for its first step over ``tree``."""
    acc, tokens = advance(policy, ROOT_ONLY, np.zeros(1, dtype=np.int64), read(model, h[None], tree,
                                                                             policy.needs_logits))
    return Sequence(ctx, policy, tree, tokens), acc.tokens


def generate_step(prompt, model, policy: Policy | None = None, *, max_kv_size: int | None = None,
                  keep: int = DEFAULT_KEEP, tree: TreeBuffers | None = None,
                  fast_path: bool | None = None, max_tokens: int | None = None, check=None) -> Iterator[Step]:
    """Yield the tokens each step emits, forever; the caller stops it.

    Args:
        prompt: token ids.
        model: either backend's ``MedusaModel``.
        policy: how tokens are picked (``make_policy``); greedy by default.
        max_kv_size: committed-token window (``keep`` sink tokens plus the most recent); None: unbounded.
        tree: the tree to verify (default the model's; ``ROOT_ONLY`` decodes plainly).
        fast_path: the backend's fast verifier (MLX lookahead, CUDA graphs); None: where it pays.
        max_tokens: the most tokens the caller will take, if known: sizes a fast path's static cache.
        check: called between prefill chunks; raises to stop a long prompt (the caller stops
            the steps by no longer iterating).
    """
    policy = policy or make_policy()
    tree = model.tree if tree is None else model.check_tree(tree)
    ctx, caches = model.make_cache(max_kv_size, keep)
    ctx.planned = None if max_tokens is None else len(prompt) + max_tokens
    seq, first = start(model, ctx, prefill(model, ctx, caches, prompt, check=check), policy, tree)
    yield Step(first, 0)
    verifier = model.fast_verifier(ctx, caches, tree, policy, fast_path)
    if verifier is None:  # a batch of one
        verifier = BatchVerifier(model)
        verifier.join(seq, ctx, caches)
    while True:
        (acc,) = batch_step(verifier, [seq])
        yield Step(acc.tokens, tree.size)


__all__ = ["ROOT_ONLY", "BatchVerifier", "Sequence", "Step", "Verified", "Verifier", "advance", "batch_step",
           "generate_step", "prefill", "read", "read_arrays", "start"]

