"""``mlx_medusa server`` on loopback for the server tests: a tiny model folder with a chat template, a
live server in a thread, the clients (``openai`` and raw HTTP), and ``stream_generate`` called directly
as the oracle. The fixtures (``folder``, ``oracle``, ``server``) are imported by the modules using them."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from contextlib import contextmanager

import mlx.core as mx
import openai
import pytest

from exo_medusa_mlx import load, stream_generate
from exo_medusa_mlx.core.tokens import chat_ids, encode_prompt
from exo_medusa_mlx.server import Scheduler, Settings
from exo_medusa_mlx.server.main import make_server
from helpers.events import wait_until
from helpers.folders import save_hf_folder
from helpers.tiny import random_heads, tiny_base

MODEL_ID = "tiny-llama"
TREE = "cpu-8"
CHAT_TEMPLATE = ("{% for m in messages %}{{ {'system': 't1', 'user': 't2', 'assistant': 't3'}[m['role']] }} "
                 "{{ m['content'] }} t4 {% endfor %}{% if add_generation_prompt %}t3{% endif %}")
PROMPTS = [" ".join(f"t{(7 * i + 3 * j) % 90 + 5}" for j in range(3 + i % 4)) for i in range(8)]
GOOD = {"model": MODEL_ID, "messages": [{"role": "user", "content": "t5 t6"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama with random Medusa heads, as a Hugging Face folder with a chat template."""
    return save_hf_folder(tmp_path_factory.mktemp("tiny_server"), "llama", tiny_base("llama"), random_heads(),
                          chat_template=CHAT_TEMPLATE)


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
def serving(folder, *, backend="mlx", queue_size=32, time_limit=300.0, decode_concurrency=8, tree=TREE,
            **settings):
    """A live server on a free loopback port (uvicorn in a thread); yields (base url, scheduler)."""
    if backend == "torch":
        from exo_medusa_mlx.torch_compat import load as load_torch

        loader, on_exit = lambda: load_torch(str(folder), heads=folder / "medusa", tree=tree), None
    else:
        loader = load if folder is None else (lambda: load(str(folder), heads=folder / "medusa", tree=tree))
        on_exit = mx.clear_streams
    scheduler = Scheduler(loader, queue_size, time_limit, on_exit, decode_concurrency)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = make_server(scheduler, Settings(settings.pop("model_id", MODEL_ID), **settings), "127.0.0.1", 0,
                         "warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started or not thread.is_alive(), 120), "the server did not start"
    assert thread.is_alive(), "the server thread died"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", scheduler
    finally:
        server.should_exit = True
        thread.join(30)
        scheduler.close()
        sock.close()


@pytest.fixture(scope="module")
def server(folder):
    """(base url, scheduler) of a server on ``folder`` for the whole module."""
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
