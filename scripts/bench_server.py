#!/usr/bin/env python
"""Tokens/s through ``mlx_medusa server`` with one streaming client against ``stream_generate``
called directly, on the same chat prompts (greedy, the bench prompts), in one run; the texts must match.

    python scripts/bench_server.py --max-tokens 48 [--num-prompts 24] [--model M --heads H --tree T --backend B]

Both are timed end to end per prompt (prefill included, from the call or request to the last token)
and summed; "decode tok/s" is the mean of the generation rates each side reports. The server runs
as its own process (``python -m exo_medusa_mlx server``) on a free loopback port; the two are
interleaved prompt by prompt, each first in turn, so that other load on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import socket
import subprocess
import sys
import time

import exo_medusa_mlx

exo_medusa_mlx.setup_blas()  # before the first import of mlx
from exo_medusa_mlx.training.prompts import bench_prompts
from exo_medusa_mlx.server.main import backend_api
from exo_medusa_mlx.core.tokens import chat_ids


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--backend", choices=["auto", "mlx", "torch"], default="auto")
    p.add_argument("--model", default=None)
    p.add_argument("--heads", default=None)
    p.add_argument("--tree", default=None)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--num-prompts", type=int, default=24)
    return p


def start_server(args) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "exo_medusa_mlx", "server", "--port", str(port), "--log-level", "WARNING",
           "--backend", args.backend]
    for flag in ("model", "heads", "tree"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag}", getattr(args, flag)]
    return subprocess.Popen(cmd), port


def wait_ready(server: subprocess.Popen, port: int) -> None:
    end = time.monotonic() + 600
    while True:
        if server.poll() is not None or time.monotonic() > end:
            sys.exit("error: the server did not start (see its output above)")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return
        except ConnectionRefusedError:
            time.sleep(0.5)


def direct(model, tokenizer, stream_generate, prompt: str, max_tokens: int) -> dict:
    """One ``stream_generate`` call on the chat prompt the server would build."""
    ids = chat_ids(tokenizer, [{"role": "user", "content": prompt}])
    tic, text = time.perf_counter(), ""
    for r in stream_generate(model, tokenizer, ids, max_tokens=max_tokens):
        text += r.text
    return {"text": text, "tokens": r.generation_tokens, "seconds": time.perf_counter() - tic,
            "tps": r.generation_tps, "accepted": r.mean_accepted}


def request(port: int, prompt: str, max_tokens: int) -> dict:
    """One streamed chat request, read as a client would: the text, tokens, seconds and Medusa figures."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    tic = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        sys.exit(f"error: the server answered {resp.status}: {resp.read().decode()[:500]}")
    text, last = "", None
    for line in resp:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk["choices"]:
            text += chunk["choices"][0]["delta"].get("content") or ""
        if chunk.get("usage"):
            last, seconds = chunk, time.perf_counter() - tic
    conn.close()
    return {"text": text, "tokens": last["usage"]["completion_tokens"], "seconds": seconds,
            "tps": last["medusa"]["generation_tps"], "accepted": last["medusa"]["mean_accepted"]}


def summary(name: str, rows: list[dict]) -> tuple[float, str]:
    tokens, seconds = sum(r["tokens"] for r in rows), sum(r["seconds"] for r in rows)
    e2e = tokens / seconds
    decode = sum(r["tps"] for r in rows) / len(rows)
    accepted = sum(r["accepted"] for r in rows) / len(rows)
    return e2e, f"| {name} | {tokens} | {seconds:.2f} | {e2e:.2f} | {decode:.2f} | {accepted:.2f} |"


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    if args.max_tokens < 1 or args.num_prompts < 1:
        sys.exit("error: --max-tokens and --num-prompts must be >= 1")
    prompts = [p["prompt"] for p in bench_prompts()[: args.num_prompts]]
    server, port = start_server(args)
    try:
        load, stream_generate, _ = backend_api(argparse.Namespace(**vars(args), dtype=None, device=None))
        model, tokenizer = load()
        wait_ready(server, port)
        run_direct = functools.partial(direct, model, tokenizer, stream_generate, max_tokens=args.max_tokens)
        run_served = functools.partial(request, port, max_tokens=args.max_tokens)
        run_direct("Hi"), run_served("Hi")  # warm-up
        direct_rows, served = [], []
        # Interleaved, each first in turn, so that load on a shared machine falls on both alike.
        for i, p in enumerate(prompts):
            for run, rows in ([(run_direct, direct_rows), (run_served, served)][:: 1 if i % 2 == 0 else -1]):
                rows.append(run(p))
    finally:
        server.terminate()
        server.wait(60)
    same = sum(a["text"] == b["text"] for a, b in zip(direct_rows, served))
    e2e_direct, row_direct = summary("stream_generate, direct", direct_rows)
    e2e_served, row_served = summary("mlx_medusa server, 1 streaming client", served)
    print(f"{len(prompts)} prompts, max {args.max_tokens} new tokens, greedy, backend {args.backend}")
    print("| path | tokens | seconds | end-to-end tok/s | decode tok/s | mean accepted |")
    print("|---|---|---|---|---|---|")
    print(row_direct)
    print(row_served)
    print(f"server / direct: {e2e_served / e2e_direct:.3f} (target >= 0.90); same text on {same}/{len(prompts)} prompts")
    if same != len(prompts):
        sys.exit("error: the server's greedy text differs from stream_generate's")


if __name__ == "__main__":
    main()
