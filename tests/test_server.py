"""``mlx_medusa server`` on loopback: the official ``openai`` client for good requests, raw HTTP for bad
ones, a bounded load test; every answer checked against ``stream_generate`` called directly.

Most tests serve a tiny random model saved as a Hugging Face folder (word-level tokenizer, a chat
template); one serves the real default model and compares with ``mlx_medusa generate``.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
from contextlib import contextmanager

import mlx.core as mx
import openai
import pytest
from mlx.utils import tree_flatten

from exo_medusa_mlx import load, stream_generate
from exo_medusa_mlx.server import Scheduler, Settings
from exo_medusa_mlx.server.main import make_server
from exo_medusa_mlx.core.stops import StopMatcher
from exo_medusa_mlx.core.tokens import chat_ids, encode_prompt
from tiny import CONFIGS, VOCAB, random_heads, tiny_base

MODEL_ID = "tiny-llama"
TREE = "cpu-8"
CHAT_TEMPLATE = ("{% for m in messages %}{{ {'system': 't1', 'user': 't2', 'assistant': 't3'}[m['role']] }} "
                 "{{ m['content'] }} t4 {% endfor %}{% if add_generation_prompt %}t3{% endif %}")
PROMPTS = [" ".join(f"t{(7 * i + 3 * j) % 90 + 5}" for j in range(3 + i % 4)) for i in range(8)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama with random Medusa heads, as a Hugging Face folder with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tiny_server")
    (folder / "config.json").write_text(json.dumps(CONFIGS["llama"]))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(tiny_base("llama").parameters())))
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE}))
    random_heads().save(folder / "medusa")
    return folder


@pytest.fixture(scope="module")
def oracle(folder):
    """``stream_generate`` called directly on its own copy of the model: (text, prompt and completion tokens)."""
    model, tokenizer = load(str(folder), heads=folder / "medusa", tree=TREE)

    def run(prompt=None, messages=None, max_tokens=12, temp=0.0, seed=None, top_p=1.0):
        ids = chat_ids(tokenizer, messages) if messages is not None else encode_prompt(tokenizer, prompt).tolist()
        text, r = "", None
        for r in stream_generate(model, tokenizer, ids, max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed):
            text += r.text
        return text, r.prompt_tokens, r.generation_tokens

    run.tokenizer = tokenizer
    return run


@contextmanager
def serving(folder, *, backend="mlx", queue_size=32, time_limit=300.0, tree=TREE, **settings):
    """A live server on a free loopback port (uvicorn in a thread); yields (base url, scheduler)."""
    if backend == "torch":
        from exo_medusa_mlx.torch_compat import load as load_torch, stream_generate as generate_torch

        loader, gen, on_exit = lambda: load_torch(str(folder), heads=folder / "medusa", tree=tree), generate_torch, None
    else:
        loader = load if folder is None else (lambda: load(str(folder), heads=folder / "medusa", tree=tree))
        gen, on_exit = stream_generate, mx.clear_streams
    scheduler = Scheduler(loader, gen, queue_size, time_limit, on_exit)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = make_server(scheduler, Settings(settings.pop("model_id", MODEL_ID), **settings), "127.0.0.1", 0,
                         "warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server thread died"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", scheduler
    finally:
        server.should_exit = True
        thread.join(30)
        scheduler.close()
        sock.close()


@pytest.fixture(scope="module")
def server(folder):
    with serving(folder) as s:
        yield s


def client(url, **kw) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{url}/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, timeout=120, **kw)


def post(url, path, body, headers=None, raw: bytes | None = None):
    """Raw HTTP: (status, parsed JSON or text, response headers)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        return resp.status, json.loads(text), dict(resp.getheaders())
    except json.JSONDecodeError:
        return resp.status, text, dict(resp.getheaders())


def chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


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


GOOD = {"model": MODEL_ID, "messages": [{"role": "user", "content": "t5 t6"}], "max_tokens": 4}


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
