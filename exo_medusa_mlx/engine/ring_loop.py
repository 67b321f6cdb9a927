"""The ring loop, written once: one request's passes round the ring, whatever carries them.

``ring_steps`` takes the transport as a function, ``send(x, state) -> (output, state)``,
a pass through every shard: an in-process call (``run_ring`` here, used by the tests), a
gRPC hop through running nodes (``ring.client.RingClient``), or exo's own node
(``exo.node_patch``). From the last shard's result it yields what each pass emitted
(``results.process_result``: cut at EOS and ``max_tokens``, or where the context ends)
and sends the next pass, until the request finishes.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import AsyncIterator, Awaitable, Callable, Iterable, Sequence

import numpy as np

from . import protocol as st
from . import wire
from ..core.tokens import eos_ids
from .results import RingStep, on_request_finished, process_result
from .shard import as_shard

Send = Callable[[np.ndarray, "dict | None"], Awaitable[tuple]]  # a pass round the ring -> (output, state)


def check_ring(shards) -> None:
    """The shards cover one model's layers in order, each layer once."""
    if not shards:
        raise ValueError("the ring has no shards")
    first = shards[0]
    expect = 0
    for s in shards:
        if s.model_id != first.model_id or s.n_layers != first.n_layers:
            raise ValueError(f"ring mixes models: '{s.model_id}' ({s.n_layers} layers) and "
                             f"'{first.model_id}' ({first.n_layers} layers)")
        if s.start_layer != expect:
            raise ValueError(f"ring shards must cover layers in order: expected a shard starting at {expect}, "
                             f"got {s.start_layer}-{s.end_layer}")
        expect = s.end_layer + 1
    if expect != first.n_layers:
        raise ValueError(f"ring shards end at layer {expect - 1}, the model has {first.n_layers} layers")


def _over_wire(x: np.ndarray, state: dict | None):
    """What exo's gRPC hop does to a tensor and its state: bytes and JSON, and back."""
    return wire.decode_tensor(wire.encode_tensor(np.asarray(x))), wire.decode_state(wire.encode_state(state))


async def ring_steps(send: Send, result: tuple, *, max_tokens: int, eos: Iterable[int] | None = None,
                     engine=None, temp: float = 0.0, top_p: float = 1.0) -> AsyncIterator[RingStep]:
    """Each pass's ``RingStep`` (its tokens, cut at EOS and ``max_tokens``) until the request finishes.

    Args:
        send: carries a pass ``(x, state)`` through every shard; returns the last shard's (output, state).
        result: the last shard's (output, state) for the request's first pass (its prompt).
        engine: the last shard's engine, for one that emits nothing (exo's one-token rule); else None.
        temp, top_p: that rule's sampling.
    """
    n = 0
    while True:
        step = await process_result(engine, *result, n_generated=n, max_tokens=max_tokens, eos_token_id=eos,
                                    temp=temp, top_p=top_p)
        n += len(step.tokens)
        yield step
        if step.finished:
            return
        result = await send(step.next_input, step.next_state)


def in_process(pairs: Sequence, request_id: str, over_wire: bool = True) -> Send:
    """The transport of an in-process ring: each (engine, shard) in turn, as exo's node calls them."""
    async def send(x, state):
        for engine, shard in pairs:
            if over_wire:
                x, state = _over_wire(x, state)
            x, state = await engine.infer_tensor(request_id, shard, x, state)
        return x, state

    return send


async def run_ring_async(engines_and_shards: Sequence, prompt, max_tokens: int, medusa: bool = True, *,
                         temp: float = 0.0, top_p: float = 1.0, acceptance: str = "auto", seed: int | None = None,
                         request_id: str | None = None, stop_on_eos: bool = True, wire: bool = True) -> list[int]:
    """Generate up to ``max_tokens`` tokens for ``prompt`` (text or token ids) through the ring.

    Args:
        engines_and_shards: (engine, shard) pairs in layer order; an engine may appear once per shard.
        medusa: propose Medusa trees (when the last shard has heads); False: one token per pass.
        stop_on_eos: stop at the last shard's tokenizer's EOS.
        wire: pass every tensor and state through exo's wire encoding, as between machines.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens {max_tokens} must be at least 1")
    pairs = [(engine, as_shard(shard)) for engine, shard in engines_and_shards]
    check_ring([s for _, s in pairs])
    (first_engine, first_shard), (last_engine, last_shard) = pairs[0], pairs[-1]
    rid = request_id or uuid.uuid4().hex
    if isinstance(prompt, str):
        x = np.asarray(await first_engine.encode(first_shard, prompt)).reshape(1, -1)
    else:
        x = np.asarray(prompt, dtype=np.int64).reshape(1, -1)
    send = in_process(pairs, rid, wire)
    out: list[int] = []
    try:
        result = await send(x, st.initial_state(temp, top_p, acceptance, seed, medusa))
        if stop_on_eos:
            await last_engine.ensure_shard(last_shard)
        eos = eos_ids(last_engine.tokenizer) if stop_on_eos else None
        async for step in ring_steps(send, result, max_tokens=max_tokens, eos=eos, engine=last_engine,
                                     temp=temp, top_p=top_p):
            out += step.tokens
        return out
    finally:
        for engine, _ in pairs:
            await on_request_finished(engine, rid)


def run_ring(engines_and_shards: Sequence, prompt, max_tokens: int, medusa: bool = True, **kw) -> list[int]:
    """``run_ring_async`` for synchronous callers (starts its own event loop)."""
    return asyncio.run(run_ring_async(engines_and_shards, prompt, max_tokens, medusa, **kw))
