"""``engine/ring_loop.py``: the one ring loop over a scripted transport (no model): what each pass
emitted, cut at EOS and ``max_tokens``; the next pass sent; the end where the last shard says so."""

from __future__ import annotations

import asyncio

import numpy as np

from exo_medusa_mlx.engine import protocol as st
from exo_medusa_mlx.engine.ring_loop import ring_steps


def last_shard(emitted: list[int], position: int, finish: str | None = None) -> tuple[None, dict]:
    """A last shard's (output, state): tokens emitted, then a one-token next pass, or the end."""
    state = {**st.initial_state(), st.EMITTED: np.array(emitted)}
    if finish is not None:
        return None, {**state, st.FINISH: finish}
    return None, {**state, st.NEXT + "tokens": np.array([emitted[-1]]), st.NEXT + "positions": np.array([position])}


def run(results: list, **kw) -> tuple[list[list[int]], list]:
    """The tokens of each step, and the passes sent, for a transport answering ``results`` in turn."""
    sent, answers = [], iter(results[1:])

    async def send(x, state):
        sent.append((x.tolist(), None if state is None else state[st.POSITIONS].tolist()))
        return next(answers)

    async def main():
        return [step.tokens async for step in ring_steps(send, results[0], **kw)]

    return asyncio.run(main()), sent


def test_each_pass_emits_and_sends_the_next():
    results = [last_shard([5], 10), last_shard([6, 7, 8], 13), last_shard([9], 14)]
    steps, sent = run(results, max_tokens=5)
    assert steps == [[5], [6, 7, 8], [9]]
    assert sent == [([[5]], [10]), ([[8]], [13])]  # the third pass's output ended the request at 5 tokens


def test_cut_at_eos_and_max_tokens():
    results = [last_shard([5], 10), last_shard([6, 7, 8], 13), last_shard([9], 14)]
    assert run(results, max_tokens=3)[0] == [[5], [6, 7]]
    assert run(results, max_tokens=10, eos=[7])[0] == [[5], [6, 7]]


def test_the_last_shard_ends_the_request_at_the_context_end():
    results = [last_shard([5], 10), last_shard([6, 7], None, finish="length"), last_shard([1], 99)]
    steps, sent = run(results, max_tokens=100)
    assert steps == [[5], [6, 7]] and len(sent) == 1  # nothing sent after the end


def test_an_engine_that_emits_nothing_gets_exos_one_token_rule():
    class OneToken:
        async def sample(self, x, temp=0.0, top_p=1.0):
            return np.array([int(np.argmax(x[0, -1]))])

    logits = np.zeros((1, 2, 10), np.float32)
    logits[0, -1, 4] = 1.0
    steps, sent = run([(logits, None), (logits, None)], max_tokens=2, engine=OneToken())
    assert steps == [[4], [4]] and sent == [([[4]], None)]
