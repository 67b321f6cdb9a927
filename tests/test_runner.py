"""``engine/runner.py``: the synchronous per-pass runner, called directly as a test or a rank
would (no asyncio, no worker thread): a ring of runners == ``generate_step``; a refused pass
changes nothing; a stock pass gets exo's logits and no state."""

from __future__ import annotations

import numpy as np
import pytest

import oracle
from exo_medusa_mlx.core.step import generate_step
from exo_medusa_mlx.core.tree import build_tree, tree_choices
from exo_medusa_mlx.engine import protocol as st
from exo_medusa_mlx.engine.mlx_backend import MLXShard, load_shard_model
from exo_medusa_mlx.engine.runner import ShardRunner
from exo_medusa_mlx.engine.shard import Shard
from exo_medusa_mlx.model import MedusaModel
from hostile import save_folder
from tiny import CONFIGS, random_heads, tiny_base

CONTEXT = CONFIGS["llama"]["max_position_embeddings"]
PROMPT = np.array([1, 5, 9, 3, 7, 2, 8, 11, 4])
N = 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base, heads = tiny_base("llama"), random_heads(4)
    folder = save_folder(tmp_path_factory.mktemp("runner") / "llama", CONFIGS["llama"], base, heads)
    ref = oracle.take(generate_step(PROMPT, MedusaModel(base, heads, build_tree(tree_choices("cpu-8")))), N)[0]
    return folder, ref


def runners(folder, ranges) -> list[ShardRunner]:
    out = []
    for a, b in ranges:
        shard = Shard("m", a, b, 2)
        heads = folder / "medusa" if shard.is_last_layer() else None
        model, tokenizer = load_shard_model(shard, folder, heads, "cpu-8")
        out.append(ShardRunner(MLXShard(shard, tokenizer, model), CONTEXT))
    return out


def passes(ring: list[ShardRunner], sessions: list, x, state, rid: str = "r"):
    """One pass through every runner; returns the last one's (output, state)."""
    for i, r in enumerate(ring):
        p = r.check(rid, sessions[i], x, state)
        sessions[i] = p.session
        x, state = r.run(p)
    return x, state


def drive(ring: list[ShardRunner], n: int) -> list[int]:
    sessions = [None] * len(ring)
    _, state = passes(ring, sessions, PROMPT[None], st.initial_state())
    out = st.emitted_tokens(state).tolist()
    while len(out) < n:
        _, state = passes(ring, sessions, *st.next_request(state))
        out += st.emitted_tokens(state).tolist()
    return out[:n]


def test_a_ring_of_runners_equals_generate_step(tiny):
    folder, ref = tiny
    assert drive(runners(folder, [(0, 1)]), N) == ref
    assert drive(runners(folder, [(0, 0), (1, 1)]), N) == ref


def test_a_refused_pass_changes_nothing(tiny):
    folder, ref = tiny
    ring = runners(folder, [(0, 0), (1, 1)])
    sessions = [None, None]
    _, state = passes(ring, sessions, PROMPT[None], st.initial_state())
    out = st.emitted_tokens(state).tolist()
    x, nxt = st.next_request(state)
    _, state = passes(ring, sessions, x, nxt)  # a tree pass: pending on both shards
    out += st.emitted_tokens(state).tolist()
    x, nxt = st.next_request(state)
    before = [(s.ctx.committed, s.pending) for s in sessions]
    stale = {**nxt, st.POSITIONS: nxt[st.POSITIONS] - 1}
    with pytest.raises(ValueError, match="out of sync"):
        ring[0].check("r", sessions[0], x, stale)
    with pytest.raises(ValueError, match="unknown request id 'other'"):
        ring[0].check("other", None, x, nxt)  # a tree pass for a request the shard never saw
    assert [(s.ctx.committed, s.pending) for s in sessions] == before
    while len(out) < N:  # the request goes on as if nothing happened
        _, state = passes(ring, sessions, x, nxt)
        out += st.emitted_tokens(state).tolist()
        x, nxt = st.next_request(state)
    assert out[:N] == ref


def test_a_stock_pass_gets_logits_and_no_state(tiny):
    folder, ref = tiny
    (runner,) = runners(folder, [(0, 1)])
    p = runner.check("stock", None, PROMPT[None], {})
    logits, state = runner.run(p)
    assert state is None and logits.shape == (1, len(PROMPT), CONFIGS["llama"]["vocab_size"])
    assert int(np.argmax(logits[0, -1])) == ref[0]
