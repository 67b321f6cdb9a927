"""The shard engines as a ring in one process: tiny models saved once per session (the ``llama``
fixture, imported by the modules using it), engines and their shards, a pass through every shard,
exo's own engine test, oracle heads on the last shard, and a ring driven as exo 0.0.x's stock node
drives it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from exo_medusa_mlx.engine.downloader import LocalShardDownloader
from exo_medusa_mlx.engine.mlx_backend import MedusaMLXInferenceEngine
from exo_medusa_mlx.engine.shard import Shard
from helpers import oracle
from helpers.folders import save_hf_folder
from helpers.tiny import N_LAYERS, random_heads, tiny_base

SPLITS = {1: [(0, 3)], 2: [(0, 1), (2, 3)], 3: [(0, 0), (1, 2), (3, 3)]}  # layers of 1, 2 or 3 shards


def ring(downloader, model_id, n_shards, engine_cls=MedusaMLXInferenceEngine, **kw):
    """(engine, shard) pairs holding the N_LAYERS layers of ``model_id`` in ``n_shards`` shards."""
    return [(engine_cls(downloader, **kw), Shard(model_id, a, b, N_LAYERS)) for a, b in SPLITS[n_shards]]


class OracleEngine(oracle.OracleEngine, MedusaMLXInferenceEngine):
    """The last shard with heads that know the greedy continuation (``oracle.OracleEngine``)."""

    @staticmethod
    def back(rows, like):
        return mx.array(rows)


_BUILT: dict[str, SimpleNamespace] = {}


def built(name: str, tmp_path_factory) -> SimpleNamespace:
    """A tiny N_LAYERS model of family ``name`` with random heads, saved once per session:
    (name, base, heads, dl: a downloader serving it with tree cpu-8, folder)."""
    if name not in _BUILT:
        base = tiny_base(name, layers=N_LAYERS)
        heads = random_heads(4)
        folder = save_hf_folder(tmp_path_factory.mktemp(name), name, base, heads)
        dl = LocalShardDownloader({name: folder}, trees={name: "cpu-8"})
        _BUILT[name] = SimpleNamespace(name=name, base=base, heads=heads, dl=dl, folder=folder)
    return _BUILT[name]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The tiny llama every engine test splits (``built("llama")``)."""
    return built("llama", tmp_path_factory)


def run_pass(pairs, rid, x, state):
    """One pass of request ``rid`` through every (engine, shard): the last output and state."""
    async def go(x, state):
        for engine, shard in pairs:
            x, state = await engine.infer_tensor(rid, shard, x, state)
        return x, state

    return asyncio.run(go(x, state))


async def exo_engine_test(engine1, engine2, model_id: str, n_layers: int, prompt: str):
    """Full shard vs two split shards: equal outputs for the prompt and the next step, two request ids
    (what exo 0.0.x's own ``test_inference_engine`` checks)."""
    full = Shard(model_id, 0, n_layers - 1, n_layers)
    pp = n_layers // 2 - 1
    first, second = Shard(model_id, 0, pp, n_layers), Shard(model_id, pp + 1, n_layers - 1, n_layers)

    resp_full, state_full = await engine1.infer_prompt("A", full, prompt)
    token_full = (await engine1.sample(resp_full)).reshape(1, -1)
    next_full, _ = await engine1.infer_tensor("A", full, token_full, state_full)

    resp1, state1 = await engine1.infer_prompt("B", first, prompt)
    resp2, state2 = await engine2.infer_tensor("B", second, resp1, state1)
    token2 = (await engine2.sample(resp2)).reshape(1, -1)
    resp3, state3 = await engine1.infer_tensor("B", first, token2, state2)
    resp4, _ = await engine2.infer_tensor("B", second, resp3, state3)

    assert resp_full.shape[:2] == (1, len(await engine1.encode(full, prompt)))
    assert np.array_equal(resp_full, resp2)
    assert np.array_equal(next_full, resp4)
    assert np.array_equal(token_full, token2)


async def stock_ring(pairs, prompt: np.ndarray, n: int, hop=None, rid: str = "stock"):
    """What exo 0.0.x's stock node does: the prompt with exo's default state ``{}``, then one
    token per pass, sampled by the last engine and sent as (1, 1) with the state the last
    shard returned. ``hop`` stands for exo's serializer between nodes. Returns (tokens, states)."""
    x, state, out, states = prompt[None], {}, [], []
    while len(out) < n:
        for engine, shard in pairs:
            if hop is not None and state is not None:
                state = hop(state)
            x, state = await engine.infer_tensor(rid, shard, x, state)
            states.append(state)
        token = int((await pairs[-1][0].sample(x)).item())
        out.append(token)
        x = np.array([[token]])
    return out, states
