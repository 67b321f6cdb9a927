"""``mlx_medusa server`` decoding concurrent requests in one batch: each request's text equals that
request alone (greedy, and sampled with its own seed), whatever else is in the batch and whenever it
joined; a request cancelled mid-batch frees its row for a waiting one (``helpers/server.py``'s tiny
model and oracle)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers.server import MODEL_ID, PROMPTS, chat, client, folder, oracle, serving  # noqa: F401


@pytest.fixture(scope="module")
def batched(folder):  # noqa: F811
    with serving(folder, decode_concurrency=4) as s:
        yield s


def stream_open(url: str, body: dict):
    """A streamed text completion, opened: (connection, response)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    return conn, resp


def read_chunk(resp) -> dict | None:
    """The next event's JSON; None at [DONE]."""
    while True:
        line = resp.readline()
        assert line, "the stream ended without [DONE]"
        if line.startswith(b"data: "):
            return None if line.strip() == b"data: [DONE]" else json.loads(line[6:])


def read_all(resp, text: str = "") -> tuple[str, str]:
    """The rest of a stream: (its text, finish reason)."""
    finish = None
    while (chunk := read_chunk(resp)) is not None:
        text += chunk["choices"][0]["text"]
        finish = chunk["choices"][0]["finish_reason"] or finish
    return text, finish


def ask(url: str, case: dict, stream: bool) -> tuple[str, int]:
    """One request through the openai client: (its text, its verification steps)."""
    case, c = dict(case), client(url)
    kind = c.chat.completions if "messages" in case else c.completions
    r = kind.create(model=MODEL_ID, stream=stream, **case)
    if not stream:
        return (r.choices[0].message.content if "messages" in case else r.choices[0].text), r.medusa["steps"]
    text, steps = "", None
    for ch in r:
        text += (ch.choices[0].delta.content or "") if "messages" in case else ch.choices[0].text
        steps = (getattr(ch, "medusa", None) or {}).get("steps", steps)
    return text, steps


def alone(oracle, case: dict) -> str:  # noqa: F811
    kw = {"temp": case.get("temperature", 0.0), "top_p": case.get("top_p", 1.0), "seed": case.get("seed")}
    text = oracle(messages=case.get("messages"), prompt=case.get("prompt"), max_tokens=case["max_tokens"], **kw)[0]
    for stop in case.get("stop", []):
        text = text[: text.index(stop)] if stop in text else text
    return text


def test_concurrent_requests_each_equal_alone(batched, oracle):  # noqa: F811
    """Eight requests at once (four decode, four wait their turn): lengths, kinds, stop strings,
    temperatures and seeds of their own; each equals its request alone, and they shared steps."""
    url, scheduler = batched
    full = oracle(prompt=PROMPTS[2], max_tokens=20)[0]
    stop = full.split()[3]
    cases = [dict(prompt=PROMPTS[i], max_tokens=m) for i, m in ((0, 30), (1, 3), (3, 17), (4, 24))]
    cases += [dict(messages=chat(PROMPTS[5]), max_tokens=22), dict(prompt=PROMPTS[2], max_tokens=20, stop=[stop]),
              dict(prompt=PROMPTS[6], max_tokens=16, temperature=1.5, top_p=0.95, seed=7),
              dict(messages=chat(PROMPTS[7]), max_tokens=16, temperature=1.0, seed=11)]
    before = scheduler.stats.steps if scheduler.stats else 0
    with ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(lambda k: ask(url, cases[k], bool(k % 2)), range(len(cases))))
    want = [alone(oracle, case) for case in cases]
    greedy = [k for k, case in enumerate(cases) if "temperature" not in case]
    assert [got[k][0] for k in greedy] == [want[k] for k in greedy]
    assert want[5] != full and all(want)
    # Sampled: a batch's size changes a request's tree and so its draws (never its distribution); alone,
    # a seed gives stream_generate's text (test_server.py). Here: whole answers, of their own length.
    for k in set(range(len(cases))) - set(greedy):
        ids = oracle.tokenizer.encode(got[k][0], add_special_tokens=False) if got[k][0] else []
        assert len(ids) == cases[k]["max_tokens"], (k, got[k][0])
    assert scheduler.stats.steps - before < sum(steps for _, steps in got)  # steps shared by the batch


def test_a_request_joining_mid_decode_equals_alone(batched, oracle):  # noqa: F811
    url, _ = batched
    conn, resp = stream_open(url, {"prompt": PROMPTS[0], "max_tokens": 300})
    head = "".join(read_chunk(resp)["choices"][0]["text"] for _ in range(3))  # the first is decoding
    late = ask(url, dict(prompt=PROMPTS[1], max_tokens=12), False)[0]
    assert late == oracle(prompt=PROMPTS[1], max_tokens=12)[0]
    text, finish = read_all(resp, head)  # the first was still decoding when the late one finished
    conn.close()
    assert text == oracle(prompt=PROMPTS[0], max_tokens=300)[0] and finish in ("length", "stop")


def test_a_cancelled_request_frees_its_row(folder, oracle):  # noqa: F811
    """Two rows, both busy, a third request waiting: one client hangs up, the waiting request takes its
    row while the other is still decoding, and every answer equals its request alone."""
    with serving(folder, decode_concurrency=2) as (url, scheduler):
        a = stream_open(url, {"prompt": PROMPTS[0], "max_tokens": 400})
        b = stream_open(url, {"prompt": PROMPTS[1], "max_tokens": 400})
        heads = [read_chunk(resp)["choices"][0]["text"] for _, resp in (a, b)]  # both decoding
        out = {}
        waiting = threading.Thread(target=lambda: out.update(c=read_all(stream_open(url, {
            "prompt": PROMPTS[3], "max_tokens": 10})[1])))
        waiting.start()
        b[0].sock.shutdown(socket.SHUT_RDWR)
        b[0].close()
        waiting.join(120)
        assert out["c"] == (oracle(prompt=PROMPTS[3], max_tokens=10)[0], "length")
        assert [o for o, _ in scheduler.finished] == ["cancelled", "length"]  # the first still decodes
        text, _ = read_all(a[1], heads[0])
        a[0].close()
        assert text == oracle(prompt=PROMPTS[0], max_tokens=400)[0]


def test_one_at_a_time_with_decode_concurrency_1(folder, oracle):  # noqa: F811
    with serving(folder, decode_concurrency=1) as (url, scheduler):
        cases = [dict(prompt=PROMPTS[i], max_tokens=8) for i in range(3)]
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda c: ask(url, c, False), cases))
        assert [text for text, _ in got] == [alone(oracle, c) for c in cases]
        assert scheduler.stats.steps == sum(steps for _, steps in got)  # no step shared
