"""``mlx_medusa server`` on loopback: the official ``openai`` client for good requests, raw HTTP for bad
ones, a bounded load test; every answer checked against ``stream_generate`` called directly.

Most tests serve a tiny random model saved as a Hugging Face folder (word-level tokenizer, a chat
template); one serves the real default model and compares with ``mlx_medusa generate``.
"""

from __future__ import annotations

import http.client
import json
import random

import openai
import pytest

from exo_medusa_mlx.core.stops import StopMatcher
from exo_medusa_mlx.core.tokens import encode_prompt
from helpers.server import GOOD, MODEL_ID, PROMPTS, chat, client, folder, oracle, post, server, serving  # noqa: F401
from helpers.tiny import VOCAB


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_a_dynamic_tree_serves_plain_greedy_answers(folder, oracle, backend):
    """--tree dynamic: each step's tree picked from the heads' probabilities; the answers are greedy's."""
    if backend == "torch":
        pytest.importorskip("torch")
    with serving(folder, backend=backend, tree="dynamic:8") as (url, scheduler):
        r = client(url).chat.completions.create(model=MODEL_ID, messages=chat(PROMPTS[3]), max_tokens=16, temperature=0)
        assert r.choices[0].message.content == oracle(messages=chat(PROMPTS[3]), max_tokens=16)[0]
        assert scheduler.model.tree.size == 8


# --------------------------------------------------------------------------- stop strings


def test_stop_matcher_finds_stops_across_any_split():
    rng = random.Random(0)
    for _ in range(400):
        text = "".join(rng.choice("ab ") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("ab ") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        m, out, hit = StopMatcher(stops), "", False
        for p in pieces:
            emitted, hit = m.feed(p)
            out += emitted
            if hit:
                break
        out += "" if hit else m.flush()
        first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        assert hit == (first >= 0), (text, stops, pieces)
        assert out == (text[:first] if first >= 0 else text), (text, stops, pieces)


# --------------------------------------------------------------------------- the openai client


def test_models_and_health(server):
    url, _ = server
    assert [m.id for m in client(url).models.list().data] == [MODEL_ID]
    assert client(url).models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError):
        client(url).models.retrieve("gpt-4o")
    conn = http.client.HTTPConnection(url.removeprefix("http://").split(":")[0], int(url.rsplit(":", 1)[1]))
    conn.request("GET", "/health")
    assert json.loads(conn.getresponse().read()) == {"status": "ok"}


@pytest.mark.parametrize("stream", [False, True])
def test_chat_greedy_equals_stream_generate(server, oracle, stream):
    url, _ = server
    text, n_prompt, n_gen = oracle(messages=chat(PROMPTS[0]), max_tokens=16)
    c = client(url)
    if not stream:
        r = c.chat.completions.create(model=MODEL_ID, messages=chat(PROMPTS[0]), max_tokens=16, temperature=0)
        got, finish, usage, med = r.choices[0].message.content, r.choices[0].finish_reason, r.usage, r.medusa
    else:
        chunks = list(c.chat.completions.create(model=MODEL_ID, messages=chat(PROMPTS[0]), max_completion_tokens=16,
                                                stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        got = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1]
        assert chunks[-1].choices == [] and all(ch.usage is None for ch in chunks[:-1])
        usage, med = chunks[-1].usage, chunks[-1].medusa
    assert got == text and len(text) > 10
    assert finish == "length"
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (n_prompt, n_gen, n_prompt + n_gen)
    assert med["steps"] >= 1 and 1.0 <= med["mean_accepted"] <= 4 and med["timed_out"] is False


@pytest.mark.parametrize("stream", [False, True])
def test_completions_text_and_token_ids(server, oracle, stream):
    url, _ = server
    c = client(url)
    ids = encode_prompt(oracle.tokenizer, PROMPTS[1]).tolist()
    for prompt in (PROMPTS[1], ids):
        r = c.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=10, stream=stream)
        got = "".join(ch.choices[0].text for ch in r) if stream else r.choices[0].text
        assert got == oracle(prompt=PROMPTS[1], max_tokens=10)[0]
        if not stream:
            assert r.object == "text_completion" and r.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_across_token_boundaries(server, oracle, stream):
    url, _ = server
    full = oracle(prompt=PROMPTS[2], max_tokens=20)[0]
    words = full.split()
    assert len(words) >= 6
    # Starts inside one token's text and ends inside the next: no single token holds it.
    at = full.index(" " + words[4]) - 1
    stop = full[at : at + 4]
    assert len(stop) == 4 and " " in stop
    c = client(url)
    r = c.completions.create(model=MODEL_ID, prompt=PROMPTS[2], max_tokens=20, stop=["t999", stop], stream=stream)
    if stream:
        chunks = list(r)
        got = "".join(ch.choices[0].text for ch in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        got, finish = r.choices[0].text, r.choices[0].finish_reason
    assert got == full[: full.index(stop)] and finish == "stop"
    r = c.completions.create(model=MODEL_ID, prompt=PROMPTS[2], max_tokens=20, stop="never there")
    assert r.choices[0].text == full and r.choices[0].finish_reason == "length"


def test_seeds_reproduce_and_match_stream_generate(server, oracle):
    url, _ = server
    c = client(url)

    def sample(seed):
        return c.chat.completions.create(model=MODEL_ID, messages=chat(PROMPTS[3]), max_tokens=16, temperature=1.5,
                                         top_p=0.95, seed=seed).choices[0].message.content

    first = sample(7)
    assert first == sample(7) == oracle(messages=chat(PROMPTS[3]), max_tokens=16, temp=1.5, top_p=0.95, seed=7)[0]
    assert any(sample(s) != first for s in (1, 2, 3))


# --------------------------------------------------------------------------- bad input, raw HTTP


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/chat/completions", {**GOOD, "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/chat/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {**GOOD, "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/chat/completions", {**GOOD, "max_tokens": "4"}, 400, "max_tokens"),
    ("/v1/chat/completions", {**GOOD, "max_tokens": 4.0}, 400, "max_tokens"),
    ("/v1/chat/completions", {**GOOD, "max_completion_tokens": 600}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {**GOOD, "temperature": -0.1}, 400, "temperature"),
    ("/v1/chat/completions", {**GOOD, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {**GOOD, "top_p": 1.5}, 400, "top_p"),
    ("/v1/chat/completions", {**GOOD, "seed": -3}, 400, "seed"),
    ("/v1/chat/completions", {**GOOD, "seed": 1.5}, 400, "seed"),
    ("/v1/chat/completions", {**GOOD, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {**GOOD, "stop": 5}, 400, "stop"),
    ("/v1/chat/completions", {**GOOD, "stop": ["ok", ""]}, 400, "stop"),
    ("/v1/chat/completions", {**GOOD, "stop": ["x"] * 17}, 400, "stop"),
    ("/v1/chat/completions", {**GOOD, "n": 2}, 400, "n"),
    ("/v1/chat/completions", {**GOOD, "logprobs": True}, 400, "logprobs"),
    ("/v1/chat/completions", {**GOOD, "stream_options": {"include_usage": "yes"}}, 400, "stream_options.include_usage"),
    ("/v1/chat/completions", {**GOOD, "model": "gpt-4o"}, 404, "model"),
    ("/v1/chat/completions", {**GOOD, "model": 3}, 400, "model"),
    ("/v1/chat/completions", {**GOOD, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {k: v for k, v in GOOD.items() if k != "messages"}, 400, "messages"),
    ("/v1/chat/completions", {**GOOD, "messages": "t5"}, 400, "messages"),
    ("/v1/chat/completions", {**GOOD, "messages": [{"role": "robot", "content": "t5"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {**GOOD, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {**GOOD, "messages": chat(" ".join(["t5"] * 600))}, 400, "messages"),
    ("/v1/completions", {"prompt": "", "max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": [], "max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["t5", "t6"], "max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5, VOCAB], "max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5, 1.5]}, 400, "prompt"),
    ("/v1/completions", {"prompt": " ".join(["t5"] * 512)}, 400, "prompt"),
    ("/v1/completions", {"prompt": "t5", "max_tokens": 4, "temperature": None, "stop": None}, 200, None),
])
def test_bad_fields_are_named_and_the_server_keeps_serving(server, path, body, status, param):
    url, _ = server
    got, resp, _ = post(url, path, body)
    assert got == status, resp
    if status != 200:
        err = resp["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
        assert err["type"] == "invalid_request_error" and err["message"]
    assert post(url, "/v1/chat/completions", GOOD)[0] == 200


@pytest.mark.parametrize("raw,status,fragment", [
    (b'{"messages": [', 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"messages": [{"role": "user", "content": "t5"}], "temperature": NaN}', 400, "temperature"),
    (b'{"messages": [{"role": "user", "content": "t5"}], "top_p": Infinity}', 400, "top_p"),
    (b"\xff\xfe", 400, "JSON"),
])
def test_malformed_bodies(server, raw, status, fragment):
    url, _ = server
    got, resp, _ = post(url, "/v1/chat/completions", None, raw=raw)
    assert got == status and fragment in resp["error"]["message"], resp
    assert post(url, "/v1/chat/completions", GOOD)[0] == 200


def test_oversized_body_and_unknown_routes(folder):
    with serving(folder, max_body_bytes=1000) as (url, _):
        big = {**GOOD, "messages": chat("t5 " * 400)}
        got, resp, _ = post(url, "/v1/chat/completions", big)
        assert got == 413 and resp["error"]["code"] == "request_too_large"
        status, resp, _ = post(url, "/v1/nothing", GOOD)
        assert status == 404 and resp["error"]["code"] == "not_found"
        assert post(url, "/v1/chat/completions", GOOD)[0] == 200


def test_api_key(folder):
    with serving(folder, api_key="s3cret") as (url, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            status, resp, got_headers = post(url, "/v1/chat/completions", GOOD, headers)
            assert status == 401 and resp["error"]["code"] == "invalid_api_key"
        assert post(url, "/v1/chat/completions", GOOD, {"Authorization": "Bearer s3cret"})[0] == 200
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        assert client(url, api_key="s3cret").models.list().data[0].id == MODEL_ID
