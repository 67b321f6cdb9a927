"""``stream_generate`` / ``generate`` on torch (the neutral ones, ``core/generation.py``), and what a
transformers tokenizer lacks beside mlx-lm's wrapper: a streaming detokenizer and the config's EOS ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..core.batch_generation import BatchGenerator, batch_generate  # noqa: F401  (mlx-lm's names)
from ..core.generation import GenerationResponse, generate, stream_generate  # noqa: F401  (mlx-lm's names)


class StreamingDetokenizer:
    """Text deltas from token ids, decoding only the tail since the last emitted text.

    A delta is held back while it ends in an incomplete UTF-8 sequence.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.prefix = 0  # start of the context window re-decoded with new tokens
        self.read = 0  # tokens whose text was emitted
        self._pending = ""

    def _tail(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        return decode(self.tokens[self.prefix : self.read]), decode(self.tokens[self.prefix :])

    def add_token(self, token: int) -> None:
        self.tokens.append(token)
        before, after = self._tail()
        if after.endswith("\ufffd"):
            return
        self._pending += after[len(before) :]
        self.prefix, self.read = self.read, len(self.tokens)

    def finalize(self) -> None:
        before, after = self._tail()
        self._pending += after[len(before) :]
        self.prefix = self.read = len(self.tokens)

    @property
    def last_segment(self) -> str:
        """The text since the last call."""
        out, self._pending = self._pending, ""
        return out


class TokenizerWrapper:
    """transformers' tokenizer plus ``eos_token_ids`` and ``detokenizer`` as mlx-lm's wrapper has
    them, so both backends stop on the same tokens and stream the same text. Everything else is
    the tokenizer's."""

    def __init__(self, tokenizer, eos_token_ids: list[int]):
        self._tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids

    @property
    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self._tokenizer)

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)


def load_tokenizer(path: str | Path) -> TokenizerWrapper:
    """A model folder's tokenizer with mlx-lm's EOS rule: config.json's own ``eos_token_id``
    (one or several; not transformers' per-family defaults) plus the tokenizer's."""
    from transformers import AutoTokenizer

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    eos = json.loads((path / "config.json").read_text()).get("eos_token_id")
    ids = {int(e) for e in np.atleast_1d(eos)} if eos is not None else set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return TokenizerWrapper(tokenizer, sorted(ids))
