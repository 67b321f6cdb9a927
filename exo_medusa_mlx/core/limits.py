"""What one request may ask of a model, and how a request in flight is stopped: numpy-free, both backends.

``Limits`` are the model's: its context (positions), the committed-token window
when the cache rotates, and the largest tree. A request over a limit is refused
with ``LimitError`` (a ``ValueError``: the CLIs print it in one line; a ring node
answers RESOURCE_EXHAUSTED) before any array is computed. ``CancelToken`` is
checked between prefill chunks and layers: a request whose client left, whose
deadline passed, or whose node is stopping raises ``Cancelled`` there.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

MAX_TREE_NODES = 256  # root included; mc_sim_7b_63 has 64, a GPU gains little beyond a few hundred
MAX_TREE_RANK = 4096  # a path's rank r asks the heads for their top r+1
UNKNOWN_CONTEXT = 131072  # a ring shard's cap on positions when neither the model nor its config states one


class LimitError(ValueError):
    """A request beyond what the model or the shard can hold (context, window, tree size, tensor size)."""


class Cancelled(Exception):
    """The request was cancelled (its client left, its deadline passed, or the node is stopping)."""


class CancelToken:
    """Set from any thread; ``check`` raises ``Cancelled`` on the worker thread once set."""

    def __init__(self, reason: str = "the request was cancelled"):
        self._event = threading.Event()
        self.reason = reason

    def cancel(self, reason: str | None = None) -> None:
        if reason is not None and not self._event.is_set():
            self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled(self.reason)


@dataclass(frozen=True)
class Limits:
    """A model's limits for one request.

    context: positions the model was made for (``max_position_embeddings``); None: unknown.
    window: committed tokens a rotating cache keeps (``max_kv_size``); None: every token is kept,
        so the cache grows with positions and the context bounds it.
    max_tree: nodes of the largest tree a pass may verify, root included.
    """

    context: int | None = None
    window: int | None = None
    max_tree: int = MAX_TREE_NODES

    def check_prompt(self, n: int, what: str = "prompt") -> None:
        """A prompt of ``n`` tokens leaves room for at least one more in the context."""
        if self.context is not None and n >= self.context:
            raise LimitError(f"{what} has {n} tokens, the model's context is {self.context}: shorten it to at most "
                             f"{self.context - 1} tokens")

    def check_pass(self, n: int, start: int = 0, what: str = "pass") -> None:
        """A pass of ``n`` tokens written at positions ``start..start+n-1``.

        Without a window the cache holds every position, so all must fit in the context;
        with one, the cache holds the window and positions may run on (as mlx-lm's
        rotating cache), but one pass still holds at most the context.
        """
        if self.context is None:
            return
        if n > self.context:
            raise LimitError(f"{what} carries {n} tokens, more than the model's context of {self.context}")
        if self.window is None and start + n > self.context:
            raise LimitError(f"{what} would fill positions {start}..{start + n - 1}, past the model's context of "
                             f"{self.context} tokens (the request is full: start a new one)")

    def check_tree(self, nodes: int, what: str = "tree") -> None:
        if nodes > self.max_tree:
            raise LimitError(f"{what} has {nodes} nodes, more than the limit of {self.max_tree}: use a smaller tree")


DEFAULT_TOKEN_CHARS = 256  # when a tokenizer cannot list its vocabulary
MIN_TOKEN_CHARS = 8


def max_token_chars(tokenizer) -> int:
    """The most characters one token can stand for: the longest entry of the vocabulary
    (byte-level BPE spells a byte per character; SentencePiece a character each)."""
    try:
        vocab = tokenizer.get_vocab()
        return max(MIN_TOKEN_CHARS, max(len(k) for k in vocab))
    except (AttributeError, TypeError, ValueError):
        return DEFAULT_TOKEN_CHARS


def check_prompt_text(tokenizer, text: str, context: int | None, what: str = "prompt") -> None:
    """Refuse text that cannot fit in the context however it is tokenized, before tokenizing it
    (a 200 MB prompt would take the tokenizer minutes)."""
    if context is None or not isinstance(text, str) or len(text) <= context * MIN_TOKEN_CHARS:
        return  # fits whatever the vocabulary (and the vocabulary is not listed for every prompt)
    per = max_token_chars(tokenizer)
    if len(text) > context * per:
        raise LimitError(f"{what} has {len(text)} characters: more than the model's context of {context} tokens "
                         f"can hold (at most {per} characters per token): shorten it")
