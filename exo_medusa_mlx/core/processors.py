"""Request-time sampling controls inside exact speculative sampling, framework-neutral (numpy).

Plain decoding with mlx-lm (and so exo 1.x) draws each token from
    softmax(filter(penalize(history, logits)) / temp)
where ``penalize`` is ``make_logits_processors``' repetition, presence and frequency
penalties over the last tokens of the history, and ``filter`` is ``make_sampler``'s
top-p, min-p and top-k (``accept.target_probs``); at temp 0 the token is the argmax of
the penalised logits. A Medusa step verifies a tree: the node at the end of a path
comes after the committed history *and* that path's tokens, so each node's logits are
penalised with its own path before acceptance, and the acceptance (greedy, or the exact
walk) runs on the processed distribution: the output is distributed as plain sampling
with the same controls.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence

import numpy as np

from .accept import Acceptance, Policy, exact_walk, greedy_accept, make_policy, target_probs
from .tree import TreeBuffers

PENALTY_CONTEXT = 20  # mlx-lm's default context for each penalty (exo's for repetition too)


@dataclass(frozen=True)
class Sampling:
    """What a request asks of sampling; the defaults change nothing (greedy, no filter, no penalty)."""

    temp: float = 0.0
    top_p: float = 1.0
    min_p: float = 0.0
    top_k: int = 0
    repetition_penalty: float | None = None
    repetition_context_size: int = PENALTY_CONTEXT
    presence_penalty: float | None = None
    presence_context_size: int = PENALTY_CONTEXT
    frequency_penalty: float | None = None
    frequency_context_size: int = PENALTY_CONTEXT
    banned: tuple[int, ...] = ()  # tokens never drawn (exo's bench requests ban the EOS ids)

    def __post_init__(self) -> None:
        if not 0 <= self.temp < float("inf"):
            raise ValueError(f"temperature {self.temp} must be a finite number >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p {self.top_p} must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p {self.min_p} must be in [0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k {self.top_k!r} must be a non-negative integer (0: no top-k)")
        if self.repetition_penalty is not None and not 0 <= self.repetition_penalty < float("inf"):
            raise ValueError(f"repetition_penalty {self.repetition_penalty} must be a finite number >= 0")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_context_size") and (isinstance(value, bool) or not isinstance(value, int)
                                                     or value < 1):
                raise ValueError(f"{f.name} {value!r} must be a positive integer")
            if f.name in ("presence_penalty", "frequency_penalty") and value is not None \
                    and not np.isfinite(value):
                raise ValueError(f"{f.name} {value} must be a finite number")

    @property
    def penalized(self) -> bool:
        """True when a penalty changes the logits (mlx-lm skips a penalty of None or 0)."""
        return bool(self.banned) or any(p not in (None, 0) for p in (
            self.repetition_penalty, self.presence_penalty, self.frequency_penalty))

    @property
    def plain(self) -> bool:
        """True when ``accept.make_policy(temp, top_p)`` already draws from this distribution."""
        return not self.penalized and self.min_p == 0.0 and self.top_k == 0


def penalize(logits: np.ndarray, history: Sequence[int] | np.ndarray, s: Sampling) -> np.ndarray:
    """The logits after ``s``'s penalties over ``history`` (a copy), as mlx-lm's processors.

    logits: (V,). In the logits' own dtype (float32 as mlx-lm), so greedy picks match
    bit for bit. Banned tokens first get -1e9 (exo's ``ban_token_ids``). Repetition:
    the logits of the last ``repetition_context_size`` tokens are divided by the
    penalty where positive, multiplied where negative; presence: minus the penalty
    once per token present; frequency: minus it once per occurrence.
    """
    z = np.array(logits, copy=True)
    if s.banned:
        z[list(s.banned)] = -1e9
    hist = np.asarray(history, dtype=np.int64)
    if len(hist) == 0:
        return z
    if s.repetition_penalty not in (None, 0):
        toks = hist[-s.repetition_context_size:]
        sel = z[toks]
        z[toks] = np.where(sel < 0, sel * s.repetition_penalty, sel / s.repetition_penalty)
    if s.presence_penalty not in (None, 0):
        z[hist[-s.presence_context_size:]] -= s.presence_penalty  # repeated indices: once
    if s.frequency_penalty not in (None, 0):
        # once per occurrence; a scalar of the logits' dtype: ufunc.at would round through float64
        np.subtract.at(z, hist[-s.frequency_context_size:], z.dtype.type(s.frequency_penalty))
    return z


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@dataclass
class ProcessedAcceptor:
    """An acceptor that applies ``sampling`` at every node, penalties seeing each node's own path.

    ``history`` holds the tokens the penalties see before the next step's tree and
    grows by every step's emitted tokens. With ``keep_logprobs``, each call leaves in
    ``logprobs`` the (n, V) log-probabilities each emitted token was chosen from (the
    penalised logits, normalised, before temperature and filters: mlx-lm's ``logprobs``).
    """

    sampling: Sampling
    history: list[int]
    rng: np.random.Generator
    keep_logprobs: bool = False
    logprobs: np.ndarray | None = field(default=None, init=False)
    calls: int = field(default=0, init=False)  # steps accepted so far

    def node_logits(self, tree: TreeBuffers, tree_tokens: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """(T, V) each node's processed logits; a node's path excludes the root (already in history)."""
        if not self.sampling.penalized:
            return logits
        paths: list[list[int]] = [[]]
        for k in range(1, tree.size):  # parents come before children
            paths.append(paths[int(tree.parents[k])] + [int(tree_tokens[k])])
        return np.stack([penalize(logits[k], self.history + paths[k], self.sampling) for k in range(tree.size)])

    def __call__(self, tree: TreeBuffers, tree_tokens: np.ndarray, logits: np.ndarray) -> Acceptance:
        s = self.sampling
        z = self.node_logits(tree, tree_tokens, logits)  # (T, V)
        if s.temp == 0:
            acc = greedy_accept(tree, tree_tokens, z.argmax(axis=-1))
        else:
            acc = exact_walk(tree, tree_tokens, lambda n: target_probs(z[n], s.temp, s.top_p, s.min_p, s.top_k),
                             self.rng)
        if self.keep_logprobs:
            self.logprobs = log_softmax(z[np.asarray(acc.nodes)].astype(np.float32))  # (a+1, V)
        self.history += acc.tokens
        self.calls += 1
        return acc


def make_sampling_policy(s: Sampling, history: Sequence[int] = (), seed: int | None = None,
                         logprobs: bool = False) -> Policy:
    """The policy that samples as ``s`` asks; ``history``: the tokens the penalties see first.

    Without penalties, filters or log-probabilities this is ``accept.make_policy`` (greedy
    picks on the device); otherwise ``policy.accept`` is a ``ProcessedAcceptor``.
    """
    if s.plain and not logprobs:
        return make_policy(s.temp, s.top_p, "auto", seed)
    if seed is not None and seed < 0:
        raise ValueError(f"seed {seed} must be a non-negative integer")
    acceptor = ProcessedAcceptor(s, [int(t) for t in history], np.random.default_rng(seed), logprobs)
    return Policy(acceptor, True)


__all__ = ["PENALTY_CONTEXT", "ProcessedAcceptor", "Sampling", "log_softmax", "make_sampling_policy", "penalize"]
