"""exo 0.0.x's ``Node``, changed for Medusa ring passes (``docs/node_hook.md``); ``install`` applies it.

- ``process_prompt``: a node holding one of our engines starts our protocol: the first
  pass's state gets ``state.initial_state`` (sampling at the node's ``--default-temp``).
- ``process_inference_result``: on the shard holding the last layer, a pass in our
  protocol goes to the request's ring loop (``engine.ring_loop.ring_steps``, the loop every
  driver shares; here its transport is exo's ``forward_tensor`` and the pass coming back
  round): it emits the pass's tokens (several per pass, cut at EOS and
  ``--max-generate-tokens``), hands exo's API and the peers only the tokens new in this
  pass, in pass order (exo's API appends whatever it receives), and forwards the next
  pass's input with its state to the first shard. Every other pass runs exo's own code.
- ``start``: every node frees a request's caches when it finishes (its own result or a
  peer's broadcast); the last node prints one line per request: tokens, ring passes,
  tokens per pass.

Each patch wraps exo's method and is marked, so applying it twice changes nothing.
"""

from __future__ import annotations

import asyncio
import functools
import traceback

import numpy as np

from ..engine import protocol as st
from ..core.tokens import eos_ids
from ..engine.results import on_request_finished
from ..engine.ring_loop import ring_steps

MARK = "__exo_medusa_hook__"
ON_TOKEN = "exo-medusa-free-caches"  # the node's on_token callback name
LOG_PREFIX = "exo-medusa:"


def _ours(engine) -> bool:
    from ..engine.shard_engine import MedusaShardEngine

    return isinstance(engine, MedusaShardEngine)


def _spawn(node, coro) -> asyncio.Task:
    """A task the node keeps a reference to until it is done (asyncio holds tasks weakly)."""
    tasks = node.__dict__.setdefault("_medusa_tasks", set())
    task = asyncio.create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task


async def _after(previous: asyncio.Task | None, coro) -> None:
    if previous is not None:
        await previous  # exo's broadcast_result reports its own errors and never raises
    await coro


def _broadcast_in_order(node, request_id: str, tokens: list[int], finished: bool) -> None:
    """Each pass's tokens reach the peers after the previous pass's: several tokens per pass
    would otherwise arrive scrambled, or after the final message, should two sends overtake."""
    last = node.__dict__.setdefault("_medusa_broadcasts", {})
    last[request_id] = _spawn(node, _after(last.get(request_id), node.broadcast_result(request_id, tokens, finished)))
    if finished:
        del last[request_id]  # the task itself still runs


def _free_on_finish(node, request_id: str, tokens, is_finished: bool) -> None:
    if is_finished:
        _spawn(node, on_request_finished(node.inference_engine, request_id))


async def medusa_result(node, shard, result: np.ndarray, request_id: str, inference_state: dict) -> np.ndarray:
    """The last shard's pass in our protocol, handed to the request's ring loop: a request's first
    pass starts one (``_drive``), a later one answers the loop's ``send``. Returns the tokens so far."""
    waiting = node.__dict__.setdefault("_medusa_waiting", {})
    reply = waiting.pop(request_id, None)
    if reply is None:
        _spawn(node, _drive(node, shard, request_id, (result, inference_state)))
    elif not reply.done():
        reply.set_result((result, inference_state))
    return np.array(node.buffered_token_output.setdefault(request_id, ([], False))[0])


async def _send(node, shard, request_id: str, x: np.ndarray, state: dict):
    """The ring loop's transport on exo's node: forward the pass to the first shard, then wait
    until it comes back round to this node (``medusa_result``)."""
    reply = asyncio.get_running_loop().create_future()
    waiting = node.__dict__.setdefault("_medusa_waiting", {})
    waiting[request_id] = reply
    try:
        await node.forward_tensor(shard, x, request_id, node.get_partition_index(offset=1), state)
    except BaseException:
        waiting.pop(request_id, None)
        raise
    return await reply


async def _drive(node, shard, request_id: str, first: tuple) -> None:
    """One request's ring loop on the node holding the last layer: emit each pass's tokens (several per
    pass, cut at EOS and ``--max-generate-tokens``), hand exo's API and the peers only the new ones,
    in pass order (exo's API appends whatever it receives), and forward the next pass."""
    engine = node.inference_engine
    buffered = node.buffered_token_output.setdefault(request_id, ([], False))[0]
    send = functools.partial(_send, node, shard, request_id)
    passes = 0
    try:
        async for step in ring_steps(send, first, max_tokens=node.max_generate_tokens,
                                     eos=eos_ids(engine.tokenizer), engine=engine,
                                     temp=node.default_sample_temperature):
            passes += 1
            buffered.extend(step.tokens)
            if not step.finished:
                node.outstanding_requests[request_id] = "waiting"
            node.trigger_on_token_callbacks(request_id, step.tokens, step.finished)
            _broadcast_in_order(node, request_id, step.tokens, step.finished)
    except Exception:  # noqa: BLE001 - as exo's node does with a failed pass: say so, drop the request
        # (A pass that fails on a node is reported there by exo and never comes back: its loop waits.)
        traceback.print_exc()
        node.outstanding_requests.pop(request_id, None)
        return
    node.buffered_token_output[request_id] = (buffered, True)
    node.outstanding_requests.pop(request_id, None)
    print(f"{LOG_PREFIX} request {request_id}: {len(buffered)} tokens in {passes} ring passes "
          f"({len(buffered) / passes:.2f} per pass)", flush=True)


def _process_prompt(orig):
    @functools.wraps(orig)
    async def process_prompt(self, base_shard, prompt: str, request_id: str | None = None,
                             inference_state: dict | None = None):
        inference_state = {} if inference_state is None else inference_state
        if _ours(self.inference_engine) and not st.speaks_protocol(inference_state):
            inference_state = {**inference_state, **st.initial_state(temp=self.default_sample_temperature)}
        return await orig(self, base_shard, prompt, request_id, inference_state)

    return process_prompt


def _process_inference_result(orig):
    @functools.wraps(orig)
    async def process_inference_result(self, shard, result, request_id: str | None = None,
                                       inference_state: dict | None = None):
        if shard.is_last_layer() and st.speaks_protocol(inference_state) and _ours(self.inference_engine):
            return await medusa_result(self, shard, result, request_id, inference_state)
        return await orig(self, shard, result, request_id, inference_state)

    return process_inference_result


def _start(orig):
    @functools.wraps(orig)
    async def start(self, *args, **kwargs):
        self.on_token.register(ON_TOKEN).on_next(functools.partial(_free_on_finish, self))
        return await orig(self, *args, **kwargs)

    return start


HOOKS = {"process_prompt": _process_prompt, "process_inference_result": _process_inference_result,
         "start": _start}


def patch_node(node_cls) -> list[str]:
    """Wrap exo's ``Node`` methods (``HOOKS``); returns the ones wrapped by this call."""
    missing = [name for name in HOOKS if not callable(getattr(node_cls, name, None))]
    if missing:
        raise ImportError(f"exo's {node_cls.__name__} has no {', '.join(missing)}: this is not exo 0.0.x "
                          "(install exo from its v0.0.15-alpha tag)")
    done = []
    for name, wrap in HOOKS.items():
        orig = getattr(node_cls, name)
        if getattr(orig, MARK, False):
            continue
        hooked = wrap(orig)
        setattr(hooked, MARK, True)
        setattr(node_cls, name, hooked)
        done.append(f"{node_cls.__name__}.{name}")
    return done
