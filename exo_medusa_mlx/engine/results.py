"""What exo's node does with the last shard's output when a pass may emit several tokens
(``docs/node_hook.md`` says why and where it goes in the node).

``process_result`` takes the pass's tokens from ``inference_state`` (cut at EOS and
``max_tokens``; the last shard ends the request itself when the context is full) and the
next pass's input and state, and falls back to exo's one-token rule for an engine that
emits nothing; ``on_request_finished`` frees a request's caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from . import protocol as st


@dataclass
class RingStep:
    """The outcome of one ring pass, as the node holding the last layer sees it."""

    tokens: list[int]  # emitted by this pass, cut at EOS and max_tokens
    finished: bool
    next_input: np.ndarray | None  # (1, T') token ids for the first shard; None when finished
    next_state: dict | None  # inference_state for that pass


async def process_result(engine, result: np.ndarray, inference_state: dict | None, *,
                         n_generated: int, max_tokens: int, eos_token_id: int | Iterable[int] | None = None,
                         temp: float = 0.0, top_p: float = 1.0) -> RingStep:
    """Turn the last shard's ``(result, inference_state)`` into tokens and the next pass.

    Args:
        engine: the last shard's engine (its ``sample`` serves one-token engines).
        n_generated: tokens already generated for this request.
        eos_token_id: one id or several; None never stops early.
    """
    emitted = st.emitted_tokens(inference_state)
    finished = st.finish_reason(inference_state) is not None  # the context is full: no next pass
    if emitted is None:  # an engine that emits nothing: exo's one-token rule
        token = int(np.asarray(await engine.sample(result, temp=temp, top_p=top_p)).reshape(-1)[0])
        tokens, next_input, next_state = [token], np.array([[token]], dtype=np.int64), inference_state
    else:
        tokens = emitted.tolist()
        next_input, next_state = (None, None) if finished else st.next_request(inference_state)
    eos = set() if eos_token_id is None else (
        {int(eos_token_id)} if isinstance(eos_token_id, (int, np.integer)) else {int(i) for i in eos_token_id})
    for i, t in enumerate(tokens):
        if t in eos:
            tokens, finished = tokens[: i + 1], True
            break
    room = max_tokens - n_generated
    if len(tokens) >= room:
        tokens, finished = tokens[:room], True
    if finished:
        return RingStep(tokens, True, None, None)
    return RingStep(tokens, False, next_input, next_state)


async def on_request_finished(engine, request_id: str) -> None:
    """Free the request's caches on this node's engine (exo's engines keep them until evicted)."""
    finish = getattr(engine, "finish_request", None)
    if finish is not None:
        await finish(request_id)
