"""OpenAI's response shapes for chat and text completions, whole and streamed (server-sent events).

Each finished response also carries ``medusa``: mean accepted length and verification
steps (clients ignore fields they do not know).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from .scheduler import Delta


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


DONE = b"data: [DONE]\n\n"


def usage(last: Delta) -> dict:
    r = last.response
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.generation_tokens,
            "total_tokens": r.prompt_tokens + r.generation_tokens}


def medusa(last: Delta) -> dict:
    r = last.response
    return {"mean_accepted": r.mean_accepted, "steps": r.steps, "prompt_tps": r.prompt_tps,
            "generation_tps": r.generation_tps, "timed_out": last.timed_out}


@dataclass
class Shape:
    """One request's id, time and kind; builds its response objects."""

    chat: bool
    model: str
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def _head(self, stream: bool) -> dict:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, text: str, last: Delta) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=last.finish_reason)
        return {**self._head(False), "choices": [choice], "usage": usage(last), "medusa": medusa(last)}

    def chunk(self, text: str, last: Delta | None = None, first: bool = False) -> dict:
        """A streamed piece; with ``last``, the finishing chunk (no text, finish_reason, Medusa figures)."""
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=last.finish_reason if last else None)
        out = {**self._head(True), "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        if last is not None:
            out["medusa"] = medusa(last)
        return out

    def usage_chunk(self, last: Delta) -> dict:
        """``stream_options.include_usage``: the chunk after the last, with no choices."""
        return {**self._head(True), "choices": [], "usage": usage(last), "medusa": medusa(last)}
