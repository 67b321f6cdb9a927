"""The exo 1.x engine in one process, driven as exo's runner drives it, over stand-in exo types.

The oracle is ``stream_generate`` on the same model; 2 ranks: test_distributed.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import exo1_standin as exo

exo.install()

from exo_medusa_mlx.exo1 import MedusaBuilder, MedusaEngine  # noqa: E402
from exo_medusa_mlx.generate import stream_generate  # noqa: E402
from exo_medusa_mlx.loading import load  # noqa: E402
from helpers.folders import save_hf_folder  # noqa: E402
from helpers.tiny import N_LAYERS, OracleMedusa, random_heads, tiny_base  # noqa: E402

TEXT = "t1 t5 t9 t3 t7"


class TinyMlxBuilder:
    """exo's MlxBuilder's fields and methods, loading a tiny folder on one node (no group)."""

    def __init__(self, folder):
        self.folder, self.model_id = folder, "tiny"
        self.event_sender, self.cancel_receiver = exo.Sender(), exo.Receiver()
        self.inference_model = self.tokenizer = self.group = None
        self.closed = False

    def connect(self, bound_instance):
        self.group = None

    def load(self, bound_instance):
        model, self.tokenizer = load(str(self.folder))
        self.inference_model = model.base
        yield exo.ModelLoadingResponse(layers_loaded=4, total=4)

    def close(self):
        self.closed = True


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    base = tiny_base("llama", layers=N_LAYERS)
    return save_hf_folder(tmp_path_factory.mktemp("llama"), "llama", base, random_heads(4))


@pytest.fixture
def engine(folder) -> MedusaEngine:
    builder = MedusaBuilder(TinyMlxBuilder(folder), heads=folder / "medusa", tree="cpu-8")
    builder.connect(None)
    assert [r.total for r in builder.load(None)] == [4]
    e = builder.build()
    e.warmup()
    return e


def task(text=TEXT, n=20, **params) -> exo.TextGeneration:
    p = exo.TextGenerationTaskParams(model="tiny", input=[exo.InputMessage(role="user", content=text)],
                                     max_output_tokens=n, **{"temperature": 0.0, **params})
    return exo.TextGeneration(instance_id="i", command_id=exo.CommandId(), task_params=p)


def drive(engine, *tasks, limit=10_000) -> list[tuple]:
    """Step until ``tasks`` are finished or cancelled, as exo's runner does; returns every (task_id, result)."""
    out, active = [], {t.task_id for t in tasks}
    for _ in range(limit):
        got = list(engine.step())
        out += got
        active -= {t for t, r in got if isinstance(r, (exo.FinishedResponse, exo.CancelledResponse))}
        if not active:
            return out
    raise AssertionError("the engine never finished its tasks")


def tokens_of(out, task_id) -> list[int]:
    return [r.token_id for t, r in out if t == task_id and isinstance(r, exo.TokenChunk)]


def reference(engine, text=TEXT, n=20, **kw):
    return list(stream_generate(engine.model, engine.tokenizer, text, max_tokens=n, **kw))


def test_engine_is_exos_engine_and_builder_forwards(folder):
    inner = TinyMlxBuilder(folder)
    builder = MedusaBuilder(inner, heads=folder / "medusa")
    assert isinstance(builder, exo.Builder)
    with pytest.raises(ValueError, match="before load"):
        builder.build()
    list(builder.load(None))
    engine = builder.build()
    assert isinstance(engine, exo.Engine) and engine.model.heads is not None and engine.device_rank == 0
    with pytest.raises(ValueError, match="disaggregated prefill"):
        engine.serve_prefill(None, None)
    builder.close()
    assert inner.closed


def test_chunks_equal_stream_generate_with_usage_and_stats(engine):
    t = task()
    engine.submit(t)
    out = drive(engine, t)
    ref = reference(engine)
    assert tokens_of(out, t.task_id) == [r.token for r in ref] and len(ref) == 20
    chunks = [r for _, r in out if isinstance(r, exo.TokenChunk)]
    assert "".join(c.text for c in chunks) == "".join(r.text for r in ref)
    assert all(c.usage is None and c.stats is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == "length" and last.usage.completion_tokens == 20
    assert last.usage.total_tokens == last.usage.prompt_tokens + 20 and last.stats.generation_tokens == 20
    assert out[-1] == (t.task_id, exo.FinishedResponse())


def test_acceptance_per_request(engine):
    """Heads that know the continuation: most tokens come from accepted guesses."""
    ref = [r.token for r in reference(engine, n=30)]
    prompt = engine.tokenizer.encode(TEXT)
    m = engine.model
    engine.model = OracleMedusa(m.base, m.heads, m.tree, np.array(list(prompt) + ref), ranks=(0, 1))
    t = task(n=30)
    engine.submit(t)
    out = drive(engine, t)
    assert tokens_of(out, t.task_id) == ref
    details = [r for _, r in out if isinstance(r, exo.TokenChunk)][-1].usage.completion_tokens_details
    assert details.accepted_prediction_tokens >= 15  # over 2 tokens per step
    assert details.rejected_prediction_tokens > 0  # cpu-8 verifies 7 guesses per step


def test_tasks_run_one_after_another(engine):
    a, b = task(n=8), task("t2 t4 t6", n=6)
    engine.submit(a)
    engine.submit(b)
    out = drive(engine, a, b)
    ids = [t for t, r in out if isinstance(r, exo.TokenChunk)]
    assert ids == [a.task_id] * 8 + [b.task_id] * 6
    assert tokens_of(out, b.task_id) == [r.token for r in reference(engine, "t2 t4 t6", n=6)]


@pytest.mark.parametrize("everything", [False, True])
def test_cancellation_stops_within_a_check(engine, everything):
    t = task(n=1000)
    engine.submit(t)
    out = [x for _ in range(3) for x in engine.step()]
    engine.cancel_receiver.items.append(exo.CANCEL_ALL_TASKS if everything else t.task_id)
    out += drive(engine, t)
    n = len(tokens_of(out, t.task_id))
    assert 3 <= n <= 3 + engine.check_for_cancel_every
    assert (t.task_id, exo.FinishedResponse()) in out  # how exo's runner lets go of it
    assert engine.should_cancel(t.task_id)
    if not everything:
        assert (t.task_id, exo.CancelledResponse()) in out


def test_stop_string_cuts_the_text(engine):
    pieces = [r.text for r in reference(engine)]
    ref_text = "".join(pieces)
    # A token's text that first occurs where that token starts (a stop string split
    # across chunks is cut where it completes, after the first part went out, as in exo).
    stop = next(p for k, p in enumerate(pieces[5:], 5) if ref_text.find(p) == len("".join(pieces[:k])))
    t = task(stop=[stop])
    engine.submit(t)
    out = drive(engine, t)
    chunks = [r for _, r in out if isinstance(r, exo.TokenChunk)]
    assert "".join(c.text for c in chunks) == ref_text[: ref_text.find(stop)]
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage is not None


def test_unsupported_sampling_is_an_error_chunk_and_the_engine_serves_on(engine):
    bad, good = task(top_k=20), task(n=5)
    engine.submit(bad)
    engine.submit(good)
    out = drive(engine, bad, good)
    errors = [r for t, r in out if t == bad.task_id and isinstance(r, exo.ErrorChunk)]
    assert len(errors) == 1 and "top_k" in errors[0].error_message
    assert (bad.task_id, exo.FinishedResponse()) in out and len(tokens_of(out, good.task_id)) == 5


def test_sampling_uses_the_task_seed(engine):
    a = task(n=12, temperature=0.9, seed=5)
    engine.submit(a)
    out = drive(engine, a)
    ref = [r.token for r in reference(engine, n=12, temp=0.9, seed=5)]
    assert tokens_of(out, a.task_id) == ref and ref != [r.token for r in reference(engine, n=12)]


def test_cancel_all_ends_queued_tasks_too(engine):
    running, queued = task(n=1000), task(n=1000)
    engine.submit(running)
    engine.submit(queued)
    out = [x for _ in range(3) for x in engine.step()]
    engine.cancel_receiver.items.append(exo.CANCEL_ALL_TASKS)
    out += drive(engine, running, queued)
    assert tokens_of(out, queued.task_id) == []
    assert all((t.task_id, exo.FinishedResponse()) in out for t in (running, queued))
