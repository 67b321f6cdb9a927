"""``mlx_medusa server`` under load and at its edges: disconnects, shutdown, time limits, a 16x4 load
test, a full queue; the torch backend, the command itself, the default model (``test_server.py``'s
tiny model and oracle, from ``helpers/server.py``)."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from exo_medusa_mlx.core.tokens import chat_ids
from helpers.events import wait_until
from helpers.server import (GOOD, MODEL_ID, PROMPTS, TREE, chat, client, folder, oracle, post, server,  # noqa: F401
                            serving)


# --------------------------------------------------------------------------- concurrency


def _wait_finished(scheduler, n, timeout=30.0):
    assert wait_until(lambda: len(scheduler.finished) >= n, timeout), "the job never finished"
    return scheduler.finished[n - 1]


def _jobs(scheduler) -> int:
    """Jobs the scheduler holds, queued or running."""
    return len(scheduler._jobs)


def test_disconnect_stops_the_generation(server):
    url, scheduler = server
    host, port = url.removeprefix("http://").split(":")
    # Streaming: read the first token, then hang up.
    before = len(scheduler.finished)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "t5 t6", "max_tokens": 480, "stream": True}),
                 {"Content-Type": "application/json"})
    sock = conn.sock
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    # While it generates, bad input is answered at once, not queued behind it.
    assert post(url, "/v1/chat/completions", {**GOOD, "top_p": 2})[0] == 400
    assert len(scheduler.finished) == before
    sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    outcome, tokens = _wait_finished(scheduler, before + 1)
    assert outcome == "cancelled" and tokens < 240
    # Whole response: hang up while it generates.
    before = len(scheduler.finished)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "t5 t6", "max_tokens": 480}),
                 {"Content-Type": "application/json"})
    assert wait_until(lambda: _jobs(scheduler) == 1, 30), "the request never reached the scheduler"
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    outcome, tokens = _wait_finished(scheduler, before + 1)
    assert outcome == "cancelled" and tokens < 480
    assert post(url, "/v1/chat/completions", GOOD)[0] == 200


def test_shutdown_ends_running_and_queued_generations(folder):
    out = {}

    def stream(url):
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "t5 t6", "max_tokens": 480, "stream": True}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        out["first"] = resp.readline()
        out["stream"] = resp.read()

    with serving(folder, decode_concurrency=1) as (url, scheduler):  # the second request waits its turn
        running = threading.Thread(target=stream, args=(url,))
        running.start()
        assert wait_until(lambda: "first" in out, 60), "the stream never started"
        queued = ThreadPoolExecutor(1).submit(post, url, "/v1/completions", {"prompt": "t5", "max_tokens": 480})
        assert wait_until(lambda: _jobs(scheduler) == 2, 30), "the second request never queued"
    # Our shutdown ended both (uvicorn's own, after its 5 s wait, would cut them without a word):
    # the stream ends with the shutting_down error, the queued request gets its 503.
    running.join(10)
    status, body, _ = queued.result(10)
    assert status == 503 and body["error"]["code"] == "shutting_down"
    assert b'"code": "shutting_down"' in out["stream"] and b"[DONE]" not in out["stream"]
    assert [outcome for outcome, _ in scheduler.finished] == ["cancelled", "cancelled"]


def test_time_limit_ends_a_request(folder):
    with serving(folder, time_limit=1e-6) as (url, _):
        r = client(url).completions.create(model=MODEL_ID, prompt="t5 t6", max_tokens=50)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens < 50
        assert r.medusa["timed_out"] is True


def test_load_16_clients_4_requests_each(server, oracle):
    """Every request answered, none lost, greedy answers equal the single-request answers."""
    url, _ = server
    want = {(i, kind): oracle(**({"messages": chat(p)} if kind == "chat" else {"prompt": p}), max_tokens=8)[0]
            for i, p in enumerate(PROMPTS) for kind in ("chat", "text")}

    def one_client(k):
        c, got = client(url), []
        for j in range(4):
            i, kind, stream = (k + j) % len(PROMPTS), ("chat", "text")[(k + j) % 2], bool(j % 2)
            if kind == "chat":
                r = c.chat.completions.create(model=MODEL_ID, messages=chat(PROMPTS[i]), max_tokens=8, stream=stream)
                text = "".join(ch.choices[0].delta.content or "" for ch in r) if stream else r.choices[0].message.content
            else:
                r = c.completions.create(model=MODEL_ID, prompt=PROMPTS[i], max_tokens=8, stream=stream)
                text = "".join(ch.choices[0].text for ch in r) if stream else r.choices[0].text
            got.append(((i, kind), text))
        return got

    with ThreadPoolExecutor(16) as pool:
        results = [x for got in pool.map(one_client, range(16)) for x in got]
    assert len(results) == 64
    assert [text for _, text in results] == [want[key] for key, _ in results]


def test_queue_full_answers_503_and_keeps_serving(folder, oracle):
    want = oracle(prompt="t5 t6", max_tokens=200)[0]
    with serving(folder, queue_size=1, decode_concurrency=2) as (url, _):
        def one(_):
            return post(url, "/v1/completions", {"prompt": "t5 t6", "max_tokens": 200})

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(one, range(6)))
        statuses = sorted(status for status, _, _ in answers)
        assert statuses.count(200) >= 1 and statuses.count(503) >= 1 and set(statuses) == {200, 503}, statuses
        for status, body, headers in answers:
            if status == 503:
                assert body["error"]["code"] == "queue_full" and body["error"]["type"] == "server_error"
                assert headers["retry-after"] == "1"
            else:
                assert body["choices"][0]["text"] == want
        assert post(url, "/v1/completions", {"prompt": "t5 t6", "max_tokens": 4})[0] == 200


# --------------------------------------------------------------------------- backends and the command


def test_torch_backend_equals_its_stream_generate(folder):
    pytest.importorskip("transformers")
    from exo_medusa_mlx.torch_compat import load as load_torch, stream_generate as generate_torch

    model, tokenizer = load_torch(str(folder), heads=folder / "medusa", tree=TREE)
    ids = chat_ids(tokenizer, chat(PROMPTS[4]))
    want = "".join(r.text for r in generate_torch(model, tokenizer, ids, max_tokens=12))
    with serving(folder, backend="torch") as (url, _):
        r = client(url).chat.completions.create(model=MODEL_ID, messages=chat(PROMPTS[4]), max_tokens=12)
        assert r.choices[0].message.content == want and r.usage.completion_tokens == 12


def test_the_command_serves_on_loopback(folder):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "exo_medusa_mlx", "server", "--model", str(folder), "--heads", str(folder / "medusa"),
           "--tree", TREE, "--port", str(port), "--log-level", "WARNING"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    answers = []

    def answered() -> bool:
        assert p.poll() is None, "the server exited"
        try:
            answers.append(client(f"http://127.0.0.1:{port}").completions.create(model=str(folder), prompt="t5 t6",
                                                                                max_tokens=4))
        except openai.APIConnectionError:
            return False  # not listening yet
        return True

    try:
        assert wait_until(answered, 120, poll=0.2), "the server did not start"
        assert answers[0].usage.completion_tokens == 4
    finally:
        p.terminate()
        p.wait(30)


@pytest.mark.parametrize("args,msg", [
    (["--model", "/no/such/folder"], "/no/such/folder"),
    (["--backend", "mlx", "--device", "cuda"], "--device is for --backend torch"),
])
def test_bad_flags_give_one_line_errors(args, msg):
    from exo_medusa_mlx.server.main import main

    with pytest.raises(SystemExit) as e:
        main(args)
    assert str(e.value).startswith("error: ") and msg in str(e.value)


@pytest.mark.parametrize("args,msg", [
    (["--queue-size", "-1"], "argument --queue-size: -1 must be >= 0"),
    (["--request-timeout", "0"], "argument --request-timeout: 0 must be > 0"),
    (["--top-p", "0"], "argument --top-p: 0 must be in (0, 1]"),
])
def test_bad_numbers_are_refused_at_parse_time(args, msg, capsys):
    from exo_medusa_mlx.server.main import main

    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_default_model_server_equals_mlx_medusa_generate():
    prompt = "Name three primary colors."
    cli = subprocess.run([sys.executable, "-m", "exo_medusa_mlx", "generate", "--prompt", prompt, "--max-tokens", "24",
                          "--json"], capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-2000:]
    want = json.loads(cli.stdout.strip().splitlines()[-1])
    with serving(None, model_id="HuggingFaceTB/SmolLM2-135M-Instruct") as (url, _):
        c = client(url)
        r = c.chat.completions.create(model="default_model", messages=chat(prompt), max_tokens=24)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in
                           c.chat.completions.create(model="default_model", messages=chat(prompt), max_tokens=24,
                                                     stream=True))
    assert want["medusa"] and len(want["tokens"]) > 5
    assert r.choices[0].message.content == streamed == want["text"]
    assert r.usage.completion_tokens == want["generation_tokens"] and r.usage.prompt_tokens == want["prompt_tokens"]
    assert r.medusa["mean_accepted"] > 1.0


def test_the_server_imports_without_mlx():
    """A torch-only machine serves with --backend auto."""
    pytest.importorskip("torch")
    code = """
import sys
for m in ("mlx", "mlx.core", "mlx.nn", "mlx_lm"):
    sys.modules[m] = None  # import mlx now fails, as on a machine without it
from exo_medusa_mlx.server import Scheduler, create_app
from exo_medusa_mlx.server.main import backend_api, setup_arg_parser
load, on_exit = backend_api(setup_arg_parser().parse_args([]))
assert on_exit is None
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.split() == ["ok"], p.stderr[-2000:]
