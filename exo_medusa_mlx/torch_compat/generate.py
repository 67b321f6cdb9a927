"""``stream_generate`` / ``generate`` on torch (the neutral ones, ``core/generation.py``), and the
streaming detokenizer a transformers tokenizer lacks."""

from __future__ import annotations

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
