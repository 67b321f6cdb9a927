#!/usr/bin/env python
"""Tokens/s through ``mlx_medusa server`` with one streaming client against ``stream_generate``
called directly, on the same chat prompts (greedy, the bench prompts), in one run; the texts must match.
With ``--clients N``: N streaming clients at once against the batched server and against the same
server one request at a time (``--decode-concurrency 1``): latency p50/p95 and total tokens/s of each.

    python scripts/bench_server.py --max-tokens 48 [--num-prompts 24] [--model M --heads H --tree T --backend B]
    python scripts/bench_server.py --clients 8 --rounds 3 --max-tokens 48

Both are timed end to end per prompt (prefill included, from the call or request to the last token)
and summed; "decode tok/s" is the mean of the generation rates each side reports. The server runs
as its own process (``python -m exo_medusa_mlx server``) on a free loopback port; the two are
interleaved prompt by prompt (with ``--clients``: round by round), each first in turn, so that other
load on the machine hits both alike. With ``--clients``, each round's N requests arrive at once, each
with its own bench prompt (cycled); the batched server's texts must equal the sequential one's.
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
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import exo_medusa_mlx

exo_medusa_mlx.setup_blas()  # before the first import of mlx
from exo_medusa_mlx.training.prompts import bench_prompts
from exo_medusa_mlx.server.main import backend_api
from exo_medusa_mlx.core.generation import stream_generate
from exo_medusa_mlx.core.tokens import chat_ids


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--backend", choices=["auto", "mlx", "torch"], default="auto")
    p.add_argument("--model", default=None)
    p.add_argument("--heads", default=None)
    p.add_argument("--tree", default=None)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--num-prompts", type=int, default=24)
    p.add_argument("--clients", type=int, default=0,
                   help="Streaming clients at once, against the batched and the one-at-a-time server (0: one client "
                        "against stream_generate)")
    p.add_argument("--rounds", type=int, default=3, help="With --clients: rounds of N requests on each server")
    return p


def start_server(args, *extra: str) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "exo_medusa_mlx", "server", "--port", str(port), "--log-level", "WARNING",
           "--backend", args.backend, *extra]
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


def direct(model, tokenizer, prompt: str, max_tokens: int) -> dict:
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


def load_round(port: int, prompts: list[str], max_tokens: int) -> tuple[list[dict], float]:
    """Every prompt's request at once, one client each: (their results, the round's wall seconds)."""
    tic = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        rows = list(pool.map(lambda p: request(port, p, max_tokens), prompts))
    return rows, time.perf_counter() - tic


def concurrent(args, prompts: list[str]) -> None:
    """N clients at once against the batched server and the one-at-a-time server, round by round."""
    servers = {"batched": start_server(args), "one at a time": start_server(args, "--decode-concurrency", "1")}
    results = {name: [] for name in servers}
    try:
        for server, port in servers.values():
            wait_ready(server, port)
        for _, port in servers.values():
            request(port, "Hi", 8)  # warm-up
        for k in range(args.rounds):
            batch = [prompts[(k * args.clients + i) % len(prompts)] for i in range(args.clients)]
            for name in (list(servers) if k % 2 == 0 else list(servers)[::-1]):
                results[name].append(load_round(servers[name][1], batch, args.max_tokens))
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(60)
    print(f"{args.clients} streaming clients at once, {args.rounds} rounds, max {args.max_tokens} new tokens, "
          f"greedy, backend {args.backend}")
    print("| server | total tok/s | latency p50 s | latency p95 s |")
    print("|---|---|---|---|")
    p95 = {}
    for name, rounds in results.items():
        rows = [r for rs, _ in rounds for r in rs]
        lat = [r["seconds"] for r in rows]
        p95[name] = float(np.percentile(lat, 95))
        tps = sum(r["tokens"] for r in rows) / sum(wall for _, wall in rounds)
        print(f"| {name} | {tps:.2f} | {np.percentile(lat, 50):.2f} | {p95[name]:.2f} |")
    print(f"p95 batched / one at a time: {p95['batched'] / p95['one at a time']:.3f} (target < 1)")
    texts = [[r["text"] for rs, _ in rounds for r in rs] for rounds in results.values()]
    if texts[0] != texts[1]:
        sys.exit("error: the batched server's greedy texts differ from the one-at-a-time server's")


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    if args.max_tokens < 1 or args.num_prompts < 1 or args.clients < 0 or args.rounds < 1:
        sys.exit("error: --max-tokens, --num-prompts and --rounds must be >= 1, --clients >= 0")
    if args.clients:
        return concurrent(args, [p["prompt"] for p in bench_prompts()])
    prompts = [p["prompt"] for p in bench_prompts()[: args.num_prompts]]
    server, port = start_server(args)
    try:
        load, _ = backend_api(argparse.Namespace(**vars(args), dtype=None, device=None))
        model, tokenizer = load()
        wait_ready(server, port)
        run_direct = functools.partial(direct, model, tokenizer, max_tokens=args.max_tokens)
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
