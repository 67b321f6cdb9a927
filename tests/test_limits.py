"""The pieces under the hardening, in-process: the model's limits, cancellation at the next chunk or
layer, the window refused at construction, the end of the context decoded plainly (still equal to
generate_step), model files checked by their headers, argparse types, one-line errors."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time

import numpy as np
import pytest

from exo_medusa_mlx import cli_args
from exo_medusa_mlx.core.limits import Cancelled, CancelToken, LimitError, Limits, check_prompt_text
from exo_medusa_mlx.core.model_files import check_model_folder, check_safetensors, config_context
from exo_medusa_mlx.core.slots import run_committed
from exo_medusa_mlx.core.step import ROOT_ONLY
from exo_medusa_mlx.core.tree import build_tree, tree_choices
from exo_medusa_mlx.exo import LocalShardDownloader, MedusaMLXInferenceEngine, Shard, run_ring
from exo_medusa_mlx.engine import protocol as st
from exo_medusa_mlx.engine.worker import WorkerThread
from exo_medusa_mlx.model import MedusaModel
from test_exo_engine import N_LAYERS, reference, save_hf_folder, tiny_base
from tiny import random_heads


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base, heads = tiny_base("llama"), random_heads(4)
    folder = save_hf_folder(tmp_path_factory.mktemp("tiny") / "llama", "llama", base, heads)
    return base, heads, folder


def test_limits_name_the_limit():
    lim = Limits(context=512)
    lim.check_prompt(511)
    with pytest.raises(LimitError, match="prompt has 512 tokens, the model's context is 512"):
        lim.check_prompt(512)
    lim.check_pass(12, 500)
    with pytest.raises(LimitError, match="would fill positions 500..512, past the model's context of 512"):
        lim.check_pass(13, 500)
    Limits(512, window=64).check_pass(13, 10_000)  # a window: positions run on, the cache stays bounded
    with pytest.raises(LimitError, match="carries 600 tokens, more than the model's context of 512"):
        Limits(512, window=64).check_pass(600, 0)
    with pytest.raises(LimitError, match="300 nodes, more than the limit of 256"):
        lim.check_tree(300)
    Limits().check_pass(10**9, 10**9)  # no context known: nothing to refuse


def test_prompt_text_beyond_any_tokenization_is_refused_before_tokenizing():
    class Tok:
        def get_vocab(self):
            return {"a": 0, "abcdefghijklmnopqrst": 1}  # at most 20 characters per token

    check_prompt_text(Tok(), "x" * (10 * 20), 10)
    with pytest.raises(LimitError, match="201 characters: more than the model's context of 10 tokens"):
        check_prompt_text(Tok(), "x" * 201, 10)


def test_protocol_checks_take_the_models_limits():
    shard = Shard("m", 0, 1, 4)
    with pytest.raises(LimitError, match="the pass carries 600 tokens"):
        st.check_input(shard, np.zeros((1, 600), np.int64), 64, 96, Limits(512))
    with pytest.raises(LimitError, match="a tree of 300 nodes, more than the limit of 256"):
        st.parse_request({st.DEPTHS: np.arange(300)}, 300)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="must be a finite number >= 0"):
            st.parse_settings({st.TEMP: bad})


class Placed:
    """A cache context that only counts what it commits."""

    committed = 0

    def begin(self, n):
        pass

    def commit(self, caches, nodes):
        self.committed += len(nodes)


def test_run_committed_stops_at_the_next_chunk():
    ctx, ran = Placed(), []
    token = CancelToken()

    def run(s, e):
        ran.append(s)
        if len(ran) == 2:
            token.cancel("stop")
        return np.zeros((e - s, 1))

    with pytest.raises(Cancelled, match="stop"):
        run_committed(ctx, None, 10, run, step=2, check=token.check)
    assert ran == [0, 2] and ctx.committed == 4  # two chunks committed, the third never began


def test_generate_step_prefill_can_be_stopped(tiny, monkeypatch):
    base, heads, _ = tiny
    from exo_medusa_mlx.core.step import generate_step

    monkeypatch.setattr(base.args, "max_position_embeddings", 8192)  # room for a 5000-token prompt
    model = MedusaModel(base, heads, build_tree(tree_choices("cpu-8")))
    calls = []

    def check():
        calls.append(1)
        if len(calls) > 1:
            raise Cancelled("client left")

    steps = generate_step(np.arange(5000) % 96, model, check=check)
    with pytest.raises(Cancelled, match="client left"):
        next(steps)
    assert len(calls) == 2  # before the second of three chunks of 2048


def test_engine_pass_stops_at_the_next_layer_when_its_caller_gives_up(tiny):
    _, _, folder = tiny
    dl = LocalShardDownloader({"m": folder})
    engine = MedusaMLXInferenceEngine(dl)
    shard = Shard("m", 0, N_LAYERS - 1, N_LAYERS)
    layers: list[int] = []
    started = threading.Event()
    prompt = (np.arange(300) % 96)[None]

    async def main():
        await engine.ensure_shard(shard)
        loaded = engine.runner.loaded
        done_layer = loaded.layer_done

        def slow_layer(h, check):
            layers.append(1)
            started.set()
            time.sleep(0.3)
            done_layer(h, check)

        loaded.layer_done = slow_layer
        task = asyncio.ensure_future(engine.infer_tensor("r", shard, prompt, st.initial_state()))
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await engine._run(lambda: None)  # the worker is free again
        assert len(layers) < N_LAYERS and engine.request_ids == []  # stopped early, its cache dropped
        loaded.layer_done = done_layer
        out, state = await engine.infer_tensor("next", shard, prompt, st.initial_state())
        return out, state

    out, state = asyncio.run(main())
    assert out.shape[1] == 300 and st.emitted_tokens(state) is not None
    engine.close()


def test_close_cancels_and_reports_a_busy_worker():
    w = WorkerThread("busy")
    release = threading.Event()
    w.submit(release.wait, 10)
    assert w.shutdown(timeout=0.2) is False  # still in its task
    release.set()
    assert w.shutdown(timeout=5) is True


def test_a_window_too_small_is_refused_when_the_engine_is_made():
    with pytest.raises(ValueError, match="max_kv_size 1 is too small"):
        MedusaMLXInferenceEngine(LocalShardDownloader(), max_kv_size=1)


def test_near_the_context_end_the_ring_decodes_plainly_and_exactly(tiny):
    """A tree rooted near the last position would run past the context: the last shard lays out a
    plain pass there, and the tokens still equal generate_step's up to the context's end."""
    base, heads, folder = tiny
    dl = LocalShardDownloader({"m": folder}, trees={"m": "cpu-8"})
    prompt = (np.arange(500) * 7) % 96
    n = 512 - 500
    ref = reference(MedusaModel(base, heads, build_tree(tree_choices("cpu-8"))), n=n, prompt=prompt)
    pairs = [(MedusaMLXInferenceEngine(dl), Shard("m", a, b, N_LAYERS)) for a, b in [(0, 1), (2, 3)]]
    assert run_ring(pairs, prompt, n) == ref
    assert ROOT_ONLY.size == 1


def test_model_files_are_checked_by_their_headers(tiny, tmp_path):
    _, _, folder = tiny
    weights = folder / "model.safetensors"
    assert any(name.startswith("model.layers.3.") for name in check_safetensors(weights))
    assert check_model_folder(folder)["num_hidden_layers"] == N_LAYERS
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(weights.read_bytes()[:-1])
    with pytest.raises(ValueError, match=f"is truncated: its tensors need {weights.stat().st_size} bytes"):
        check_safetensors(cut)
    # mlx-lm's args for some models (gemma, mixtral...) lack the context; the engine reads the config's.
    assert config_context({"max_position_embeddings": 8192}) == 8192
    assert config_context({"n_positions": 1024}) == 1024
    assert config_context({"text_config": {"max_position_embeddings": 4096}}) == 4096
    assert config_context({"max_position_embeddings": True}) is None
    (tmp_path / "config.json").write_text(json.dumps("a string"))
    with pytest.raises(ValueError, match="holds a JSON str, not an object"):
        check_model_folder(tmp_path)


@pytest.mark.parametrize("fn,text,ok", [
    (cli_args.finite_float, "-2.5", -2.5), (cli_args.non_negative_float, "0", 0.0),
    (cli_args.positive_float, "1e-3", 1e-3), (cli_args.probability, "1", 1.0), (cli_args.fraction, "0", 0.0),
    (cli_args.positive_int, "3", 3), (cli_args.port, "0", 0), (cli_args.kv_window, "6", 6),
])
def test_argparse_types_accept_good_values(fn, text, ok):
    assert fn(text) == ok


@pytest.mark.parametrize("fn,text", [
    (cli_args.finite_float, "nan"), (cli_args.finite_float, "-inf"), (cli_args.non_negative_float, "-0.1"),
    (cli_args.positive_float, "0"), (cli_args.probability, "0"), (cli_args.fraction, "1"),
    (cli_args.positive_int, "1.5"), (cli_args.port, "65536"), (cli_args.kv_window, "5"),
])
def test_argparse_types_refuse_bad_values(fn, text):
    with pytest.raises(argparse.ArgumentTypeError):
        fn(text)


def test_one_line_keeps_errors_short():
    text = cli_args.one_line(ValueError("Missing 9000 parameters:\n" + "model.layers.1.x, " * 10_000))
    assert "\n" not in text and len(text) <= cli_args.MAX_ERROR_CHARS and "more characters" in text


def test_heads_that_are_not_finite_are_never_written(tmp_path):
    heads = random_heads(2)
    weights = heads.reference_weights()
    weights["0.0.linear.weight"] = np.full_like(weights["0.0.linear.weight"], np.nan)
    from exo_medusa_mlx.core.heads_format import write_heads

    with pytest.raises(ValueError, match=r"heads weights 0.0.linear.weight hold NaN or infinite values"):
        write_heads(tmp_path / "out", weights, heads.config)
    assert not (tmp_path / "out").exists()
