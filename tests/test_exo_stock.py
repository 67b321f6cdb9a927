"""Our engines under stock exo's node (no Medusa hooks): plain decoding and no state, since exo's
serializer carries none; exo's surface (train/evaluate, on_progress, model cards); the
``mlx_medusa exo`` arguments. The real exo source is exercised in test_exo_real.py."""

from __future__ import annotations

import asyncio
import copy

import numpy as np
import pytest

from exo_medusa_mlx.exo import LocalShardDownloader, MedusaMLXInferenceEngine, Shard
from exo_medusa_mlx.exo.cards import DEFAULT_CARD, FLOAT_REPOS, add_model_cards
from exo_medusa_mlx.exo.launch import default_engine, exo_argv
from exo_medusa_mlx.model import MedusaModel
from test_exo_engine import N, N_LAYERS, PROMPT, SPLITS, llama, reference  # noqa: F401 (llama: a fixture)

OURS = {"medusa-mlx": "MedusaMLXInferenceEngine", "medusa-torch": "MedusaTorchInferenceEngine"}


class CountingEngine(MedusaMLXInferenceEngine):
    """Counts the Medusa steps the last shard runs (a stock node would throw every proposal away)."""

    proposals = 0

    def _load(self, *args):
        super()._load(*args)
        emit = self.runner.emit
        if getattr(emit, "counted", False):
            return

        def counted(*a):
            self.proposals += 1
            return emit(*a)

        counted.counted = True
        self.runner.emit = counted


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


def test_stock_node_decodes_plainly_and_gets_no_state(llama):
    ref = reference(MedusaModel(llama.base, None), medusa=False)
    for n_shards in (1, 2, 3):
        engines = [MedusaMLXInferenceEngine(llama.dl) for _ in SPLITS[n_shards][:-1]] + [CountingEngine(llama.dl)]
        pairs = [(e, Shard(llama.name, a, b, N_LAYERS)) for e, (a, b) in zip(engines, SPLITS[n_shards])]
        tokens, states = asyncio.run(stock_ring(pairs, PROMPT, N))
        assert tokens == ref, f"{n_shards} shards"
        assert all(s is None for s in states)  # nothing for exo's serializer to choke on
        assert engines[-1].model.heads is not None and engines[-1].proposals == 0  # heads found, no tree wasted


def test_train_and_evaluate_name_the_alternative(llama):
    engine, shard = MedusaMLXInferenceEngine(llama.dl), Shard(llama.name, 0, N_LAYERS - 1, N_LAYERS)
    x = PROMPT[None]
    for call in (engine.train, engine.evaluate):
        with pytest.raises(NotImplementedError, match="mlx_medusa train"):
            asyncio.run(call("r", shard, x, x, np.array([x.shape[1]])))


def test_local_downloader_has_exos_on_progress():
    dl, seen = LocalShardDownloader(), []
    dl.on_progress.register("broadcast").on_next(lambda shard, event: seen.append((shard, event)))  # as exo's main
    dl.on_progress.trigger_all("shard", "event")
    dl.on_progress.deregister("broadcast")
    dl.on_progress.trigger_all("shard", "again")
    assert seen == [("shard", "event")]


def test_model_cards_give_torch_float_weights():
    mlx, tinygrad = "MLXDynamicShardInferenceEngine", "TinygradDynamicShardInferenceEngine"
    cards = {  # as in exo's models.py
        "llama-3.2-1b": {"layers": 16, "repo": {mlx: "mlx-community/Llama-3.2-1B-Instruct-4bit",
                                                tinygrad: "unsloth/Llama-3.2-1B-Instruct"}},
        "qwen-2.5-0.5b": {"layers": 28, "repo": {mlx: "mlx-community/Qwen2.5-0.5B-Instruct-4bit"}},
        "gemma2-9b": {"layers": 42, "repo": {mlx: "mlx-community/gemma-2-9b-it-4bit"}},
    }
    added, corrected = add_model_cards(cards, OURS)
    assert corrected == ["qwen-2.5-0.5b: 28 -> 24"] and cards["qwen-2.5-0.5b"]["layers"] == 24
    qwen = cards["qwen-2.5-0.5b"]["repo"]
    assert qwen["MedusaMLXInferenceEngine"] == "mlx-community/Qwen2.5-0.5B-Instruct-4bit"
    assert qwen["MedusaTorchInferenceEngine"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert cards["llama-3.2-1b"]["repo"]["MedusaTorchInferenceEngine"] == "unsloth/Llama-3.2-1B-Instruct"
    # No float repo known: no torch entry rather than MLX's 4-bit weights.
    assert "MedusaTorchInferenceEngine" not in cards["gemma2-9b"]["repo"]
    assert not any("mlx-community" in c["repo"].get("MedusaTorchInferenceEngine", "") for c in cards.values())
    # Cards exo lacks: one float repo for both engines (a mixed ring holds one set of weights).
    for card in (DEFAULT_CARD, "mistral-7b"):
        repo = cards[card]["repo"]
        assert repo["MedusaMLXInferenceEngine"] == repo["MedusaTorchInferenceEngine"] == FLOAT_REPOS[card][1]
    before = copy.deepcopy(cards)
    assert add_model_cards(cards, OURS) == (0, []) and cards == before  # idempotent


def test_exo_command_arguments():
    assert exo_argv(["--disable-tui"]) == ["--inference-engine", default_engine(), "--disable-tui"]
    assert default_engine() == "medusa-mlx"  # MLX is installed here
    for given in (["--inference-engine", "medusa-torch"], ["--inference-engine=mlx", "--disable-tui"]):
        assert exo_argv(given) == given
