"""``core/step.py``: the context's end, one rule for every caller.

A sequence holds at most the model's context (tiny models: 512 positions). Greedy
Medusa must give exactly plain decoding's tokens up to the last position and stop
there with "length", in ``generate_step`` (MLX, lookahead included; torch, static
step included), ``stream_generate``, the engine ring and the server's scheduler; a
tree near the end is cut so no node runs past it; a rotating window has no end.
"""

from __future__ import annotations

import asyncio
import itertools

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step as mlx_lm_generate_step

import oracle
from exo_medusa_mlx import load, stream_generate
from exo_medusa_mlx.core.limits import LimitError
from exo_medusa_mlx.core.step import LENGTH, ROOT_ONLY, context_end, generate_step, tree_at
from exo_medusa_mlx.core.tree import build_tree, tree_choices
from exo_medusa_mlx.engine import protocol as st
from exo_medusa_mlx.engine.downloader import LocalShardDownloader
from exo_medusa_mlx.engine.mlx_backend import MedusaMLXInferenceEngine
from exo_medusa_mlx.engine.ring_loop import run_ring
from exo_medusa_mlx.engine.shard import Shard
from exo_medusa_mlx.model import MedusaModel
from exo_medusa_mlx.server.scheduler import GenerationArgs, Scheduler
from hostile import save_folder
from tiny import CONFIGS, OracleMedusa, random_heads, tiny_base

CONTEXT = CONFIGS["llama"]["max_position_embeddings"]
PROMPT_LENS = (497, 505, 510, 511)  # room for 15, 7, 2 and 1 tokens
TREES = ("cpu-8", "chain-4")


def prompt_of(n: int) -> np.ndarray:
    return (np.arange(n) * 7 + 3) % 96


@pytest.fixture(scope="module")
def base():
    return tiny_base("llama")


@pytest.fixture(scope="module")
def plain(base):
    """mlx-lm's own greedy tokens after each prompt, up to the context's last position (it runs on)."""
    out = {}
    for n in PROMPT_LENS:
        gen = mlx_lm_generate_step(mx.array(prompt_of(n)), base)
        out[n] = [int(t) for t, _ in itertools.islice(gen, CONTEXT - n)]
    return out


class Fed(OracleMedusa):
    """Oracle heads that also keep the furthest position any forward ran."""

    furthest = -1

    def hidden(self, tokens, caches, transposed=False):
        out = super().hidden(tokens, caches, transposed)
        self.furthest = max(self.furthest, int(self.positions.max()))
        return out


def steps_of(gen) -> tuple[list[int], list]:
    steps = list(itertools.islice(gen, 64))  # to its end: it must stop by itself (in fewer steps)
    return sum((s.tokens for s in steps), []), [s.finish for s in steps]


def test_tree_at_cuts_to_a_prefix_of_the_tree():
    tree = build_tree(tree_choices("cpu-8"))  # depth 3
    # Rooted at 100, its deepest node gives the token at 104: the last position of a 105-token context.
    assert tree_at(tree, 100, None) is tree and tree_at(tree, 100, 105) is tree
    for root, depth in ((101, 2), (102, 1), (103, 0)):
        cut = tree_at(tree, root, 105)
        assert cut.depth == depth and root + cut.depth + 1 == 104
        assert np.array_equal(cut.depths, tree.depths[: cut.size])  # the tree's first nodes
        assert np.array_equal(cut.tree_indices, tree.tree_indices[: cut.size])  # the same guesses
        assert np.array_equal(cut.mask, tree.mask[: cut.size, : cut.size])
    assert tree_at(tree, 103, 105) is ROOT_ONLY
    assert context_end(512, None) == 512 and context_end(512, 64) is None


@pytest.mark.parametrize("fast_path", [False, True])
@pytest.mark.parametrize("tree", TREES)
def test_greedy_medusa_stops_at_the_context_end_as_plain_decoding(base, plain, tree, fast_path):
    for n in PROMPT_LENS:
        future = np.concatenate([prompt_of(n), plain[n]])
        model = Fed(base, random_heads(4), build_tree(tree_choices(tree)), future, ranks=(0, 1))
        tokens, finishes = steps_of(generate_step(prompt_of(n), model, fast_path=fast_path))
        assert tokens == plain[n], n
        assert finishes[-1] == LENGTH and not any(finishes[:-1])
        if not fast_path:  # (the lookahead may run a step it then throws away)
            assert model.furthest <= CONTEXT - 2, n  # no node past the position of the last token's input
        plain_tokens, plain_finishes = steps_of(generate_step(prompt_of(n), model, tree=ROOT_ONLY))
        assert plain_tokens == plain[n] and plain_finishes[-1] == LENGTH


def test_a_prompt_that_fills_the_context_is_refused(base):
    with pytest.raises(LimitError, match="prompt has 512 tokens, the model's context is 512"):
        next(generate_step(prompt_of(CONTEXT), MedusaModel(base, random_heads(4), build_tree(tree_choices("cpu-8")))))


def test_a_window_has_no_end(base):
    n, W = 505, 64
    model = MedusaModel(base, random_heads(4), build_tree(tree_choices("cpu-8")))
    tokens = oracle.take(generate_step(prompt_of(n), model, max_kv_size=W), 20)[0]  # past the 7 positions left
    assert tokens == oracle.take(generate_step(prompt_of(n), model, max_kv_size=W, tree=ROOT_ONLY), 20)[0]


def test_torch_stops_at_the_context_end_as_plain_decoding():
    torch = pytest.importorskip("torch")
    from exo_medusa_mlx.torch_compat.model import MedusaModel as TorchModel
    from torch_models import CONFIGS as TORCH_CONFIGS, random_heads as torch_heads, random_model

    tb = random_model(TORCH_CONFIGS["llama"])
    end = TORCH_CONFIGS["llama"]["max_position_embeddings"]
    prompt = prompt_of(end - 9)
    with torch.inference_mode():
        ids = torch.from_numpy(prompt)[None]
        want = tb.generate(ids, do_sample=False, max_new_tokens=9)[0, len(prompt):].tolist()
    plain_tokens, finishes = steps_of(generate_step(prompt, TorchModel(tb), fast_path=False))
    assert plain_tokens == want and finishes[-1] == LENGTH
    model = TorchModel(tb, torch_heads(), build_tree(tree_choices("cpu-8")))
    for fast_path in (False, True):  # True: the static step (a CUDA graph's body), then the plain one at the end
        tokens, finishes = steps_of(generate_step(prompt, model, fast_path=fast_path))
        assert tokens == want and finishes[-1] == LENGTH, fast_path


# --------------------------------------------------------------------------- every caller


@pytest.fixture(scope="module")
def folder(base, tmp_path_factory):
    return save_folder(tmp_path_factory.mktemp("ctx") / "llama", CONFIGS["llama"], base, random_heads(4))


def ids_text(ids) -> str:
    return " ".join(f"t{i}" for i in ids)


def test_stream_generate_finishes_with_length_at_the_context_end(folder, plain):
    model, tokenizer = load(str(folder), heads=folder / "medusa", tree="cpu-8")
    for n in PROMPT_LENS:
        for medusa in (False, True):
            rs = list(stream_generate(model, tokenizer, prompt_of(n).tolist(), max_tokens=100, medusa=medusa))
            assert [r.token for r in rs] == plain[n], (n, medusa)
            assert [r.finish_reason for r in rs] == [None] * (len(rs) - 1) + [LENGTH]


class OracleEngine(oracle.OracleEngine, MedusaMLXInferenceEngine):
    back = staticmethod(lambda rows, like: mx.array(rows))


def test_the_engine_ring_stops_at_the_context_end(folder, plain):
    """A ring's last shard cuts its trees and ends the request there; every shard checks that no
    pass reaches past the context, so a tree run past it would fail the request."""
    dl = LocalShardDownloader({"m": folder}, trees={"m": "cpu-8"})
    for n in PROMPT_LENS:
        future = np.concatenate([prompt_of(n), plain[n]])
        for last in (MedusaMLXInferenceEngine(dl), OracleEngine(dl, future, (0, 1))):
            pairs = [(MedusaMLXInferenceEngine(dl), Shard("m", 0, 0, 2)), (last, Shard("m", 1, 1, 2))]
            assert run_ring(pairs, prompt_of(n), 100) == plain[n], (n, type(last).__name__)


def test_the_last_shard_says_the_request_is_finished(folder, plain):
    engine = MedusaMLXInferenceEngine(LocalShardDownloader({"m": folder}, trees={"m": "cpu-8"}))
    shard = Shard("m", 0, 1, 2)
    _, state = asyncio.run(engine.infer_tensor("r", shard, prompt_of(CONTEXT - 1)[None], st.initial_state()))
    assert st.emitted_tokens(state).tolist() == plain[CONTEXT - 1] and st.finish_reason(state) == LENGTH
    assert not any(k.startswith(st.NEXT) for k in state)  # no next pass to send
    engine.close()


def test_the_server_scheduler_finishes_with_length_at_the_context_end(folder, plain):
    scheduler = Scheduler(lambda: load(str(folder), heads=folder / "medusa", tree="cpu-8"), stream_generate,
                          on_exit=mx.clear_streams)

    async def ask(ids):
        job = scheduler.submit(GenerationArgs(ids, max_tokens=100, temp=0.0, top_p=1.0, seed=None, stops=[]))
        return [d async for d in job.stream()]

    try:
        for n in PROMPT_LENS:
            deltas = asyncio.run(ask(prompt_of(n).tolist()))
            assert "".join(d.text for d in deltas).split() == ids_text(plain[n]).split()
            assert deltas[-1].finish_reason == LENGTH and deltas[-1].response.generation_tokens == len(plain[n])
    finally:
        scheduler.close()
