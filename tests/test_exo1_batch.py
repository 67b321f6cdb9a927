"""Medusa with continuous batching inside exo 1.x's own runner (exo's ``BatchGenerator``), on exo's real source.

One driver run (``helpers/exo1_driver.py``, exo's Python 3.13 venv) with exo's batching on
(``EXO_NO_BATCH`` unset): several greedy requests at once, one joining while another
is mid-decode, one cancelled mid-batch while the others go on, one refused (an error
chunk, the batch unharmed), a prompt served again
(exo's KV prefix cache), on 1 rank, on a 2-rank pipeline and (a tiny model whose heads
split in two) on 2 ranks of exo's tensor parallelism. The oracle is exo's own
``SequentialGenerator`` serving each request alone in the same run, on the same split:
every request's tokens, text, finish reason and usage equal it, whatever else was in the batch.
"""

from __future__ import annotations

import sys

import pytest

from exo_medusa_mlx.core.machine import free_ports
from exo_medusa_mlx.default_model import DEFAULT_MODEL_ID
from helpers.exo1_plan import models_folder, run_plan, tiny_folder, venv_reason

pytestmark = pytest.mark.skipif(venv_reason() is not None, reason=str(venv_reason()))

POEM = "Write a short poem about the sea."
GREEDY = dict(temperature=0.0)
REQUESTS = {  # name: a greedy request, served alone by exo's engine (the oracle) and in batches by Medusa's
    "poem": dict(prompt=POEM, max_output_tokens=40),
    "eos": dict(prompt="What is 2+2? Answer in one short sentence.", max_output_tokens=200),
    "stop": dict(prompt=POEM, max_output_tokens=40, stop=["blue", "never"]),
    "logprobs": dict(prompt="List three colours.", max_output_tokens=16, logprobs=True, top_logprobs=3),
    "story": dict(prompt="Tell me a story about a cat who learns to fly.", max_output_tokens=32,
                  repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3),
}
JOIN_AT = 10  # tokens of "poem" before "story" is sent: it joins a batch in mid-decode
TINY = "test/tiny-tensor"  # 4 attention heads, 2 key-value heads: exo's tensor split runs on 2 ranks
TINY_REQUESTS = {"a": "t1 t2 t3", "b": "t7 t8", "c": "t20 t30 t40 t50 t60"}


def request(name: str, as_name: str | None = None, **more) -> dict:
    return dict(name=as_name or name, **REQUESTS[name], **GREEDY, **more)


def plan() -> dict:
    together = [request(n) for n in ("poem", "eos", "stop", "logprobs")] + [request("story", after=["poem", JOIN_AT])]
    cancel = [dict(name="cancel", prompt=POEM, max_output_tokens=2000, cancel_after=5, **GREEDY),
              request("story", "story-beside-cancel"),
              dict(name="too-long", prompt="sea " * 9000, max_output_tokens=8, **GREEDY)]  # past the 8192 context
    pipeline = [request("poem"), request("eos"), request("story", after=["poem", JOIN_AT])]
    smol = dict(model_id=DEFAULT_MODEL_ID, n_layers=30, hidden_size=576)
    tiny = [dict(name=n, prompt=p, max_output_tokens=24, **GREEDY) for n, p in TINY_REQUESTS.items()]
    tensor = dict(model_id=TINY, n_layers=4, ranks=2, parallel="tensor")
    return {"ports": free_ports(2), "runners": [
        dict(name="plain", env={"EXO_MEDUSA": "off", "EXO_NO_BATCH": "1"},
             requests=[request(n) for n in REQUESTS], **smol),
        dict(name="batch", requests=[together, cancel, request("poem", "poem-again")], **smol),
        dict(name="batch-2", ranks=2, requests=[pipeline], **smol),
        dict(name="tensor-plain", env={"EXO_MEDUSA": "off", "EXO_NO_BATCH": "1"}, requests=tiny, **tensor),
        dict(name="tensor-batch", requests=[tiny[:2] + [dict(tiny[2], after=["a", 4])]], **tensor),
    ]}


@pytest.fixture(scope="module")
def exo1(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("exo1-batch")
    tiny_folder(models_folder(tmp) / TINY.replace("/", "--"), "llama")
    out = run_plan(plan(), tmp, {"EXO_NO_BATCH": ""}, timeout=900)
    sys.stderr.write("".join(f"{n}: ready in {r['ready_s']:.1f} s\n" for n, r in out["runners"].items()))
    return out


def req(exo1, runner: str, name: str) -> dict:
    return exo1["runners"][runner]["requests"][name]


def same_as_alone(got: dict, want: dict) -> None:
    assert got["errors"] == [] and want["errors"] == []
    assert got["tokens"] == want["tokens"] and got["text"] == want["text"] and got["finish"] == want["finish"]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert got["usage"][key] == want["usage"][key], key


def test_the_runner_says_it_batches(exo1):
    for runner in ("batch", "batch-2", "tensor-batch"):
        log = exo1["runners"][runner]["log"]
        assert "decodes with Medusa" in log[0] and "continuous batching in exo's BatchGenerator" in log[0], log


@pytest.mark.parametrize("runner,name,oracle", [("batch", n, n) for n in REQUESTS]
                         + [("batch", "story-beside-cancel", "story"), ("batch", "poem-again", "poem")]
                         + [("batch-2", n, n) for n in ("poem", "eos", "story")])
def test_each_request_equals_exos_sequential_generator(exo1, runner, name, oracle):
    got, want = req(exo1, runner, name), req(exo1, "plain", oracle)
    same_as_alone(got, want)
    assert got["prefill"][0][0] == 0 and got["prefill"][-1][0] == got["prefill"][-1][1] > 0
    if name == "stop":
        assert got["finish"] == "stop" and len(got["tokens"]) < 40
    if name == "eos":
        assert got["finish"] == "stop" and len(got["tokens"]) < 200


@pytest.mark.parametrize("name", list(TINY_REQUESTS))
def test_tensor_parallel_requests_equal_exos_on_the_same_split(exo1, name):
    got, want = req(exo1, "tensor-batch", name), req(exo1, "tensor-plain", name)
    same_as_alone(got, want)
    assert len(got["tokens"]) == 24
    a, c = req(exo1, "tensor-batch", "a")["span"], req(exo1, "tensor-batch", "c")["span"]
    assert a[0] < c[0] < a[1], (a, c)  # "c" joined while "a" was decoding


def test_requests_were_decoded_together_and_one_joined_mid_decode(exo1):
    """Spans overlap: exo's sequential engine (and Medusa's) would serve one request after another."""
    for runner, others in (("batch", ["eos", "stop", "logprobs"]), ("batch-2", ["eos"])):
        poem = req(exo1, runner, "poem")["span"]  # the longest, sent first with the others
        for name in others:
            span = req(exo1, runner, name)["span"]
            assert span[0] < poem[1] and poem[0] < span[1], (name, span, poem)
        story = req(exo1, runner, "story")["span"]
        assert poem[0] < story[0] < poem[1], (poem, story)
    got = req(exo1, "batch", "poem")["usage"]["completion_tokens_details"]
    assert got["accepted_prediction_tokens"] > 5  # Medusa's guesses were kept in the batch


def test_logprobs_in_a_batch_as_exo_returns_them(exo1):
    got, want = req(exo1, "batch", "logprobs"), req(exo1, "plain", "logprobs")
    assert got["top_logprobs"] == want["top_logprobs"] and all(len(t) == 3 for t in got["top_logprobs"])
    assert max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"])) < 2e-3


def test_a_cancelled_request_leaves_the_batch_and_the_others_go_on(exo1):
    r = req(exo1, "batch", "cancel")
    assert 5 <= len(r["tokens"]) < 2000 and r["finish"] is None and r["errors"] == []
    beside = req(exo1, "batch", "story-beside-cancel")
    assert beside["span"][0] < r["span"][1]  # they were decoding together when the cancel came


def test_a_refused_request_gets_exos_error_chunk_and_the_batch_goes_on(exo1):
    r = req(exo1, "batch", "too-long")
    assert r["tokens"] == [] and len(r["errors"]) == 1 and "the model's context is 8192" in r["errors"][0], r
    same_as_alone(req(exo1, "batch", "story-beside-cancel"), req(exo1, "plain", "story"))


def test_a_prompt_served_again_reuses_exos_prefix_cache(exo1):
    again = req(exo1, "batch", "poem-again")
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == again["usage"]["prompt_tokens"] - 1  # all but the last (exo: one fewer)
    assert again["prefill"][-1] == [1, 1]  # only that one was prefilled
    assert req(exo1, "plain", "poem")["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
