"""``mlx_medusa ring``: start a local ring of node processes (``LocalRing``), run a prompt through it,
stream the answer and print what each node spent."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from ..cli_args import fail, interrupt_flag, kv_window, non_negative_float, non_negative_int, port, positive_float
from ..cli_args import positive_int, probability, read_prompt
from ..core.tokens import apply_template, encode_prompt, eos_ids
from .auth import TOKEN_ENV, env_token
from .client import DEFAULT_TIMEOUT_S, RingError
from .launcher import LocalRing
from .proto import HOP_MARGIN_S


def setup_arg_parser() -> argparse.ArgumentParser:
    from ..default_model import DEFAULT_MODEL_ID

    p = argparse.ArgumentParser(prog="mlx_medusa ring", allow_abbrev=False,
                                description="Start a local ring of node processes and generate through it.")
    p.add_argument("--nodes", type=positive_int, default=2, help="number of node processes")
    p.add_argument("--backends", default="mlx", help="comma-separated backend per node (one name: all nodes)")
    p.add_argument("--model", default=DEFAULT_MODEL_ID, help="model id or local Hugging Face folder")
    p.add_argument("--heads", default=None, help="Medusa heads folder (default: the model's shipped heads)")
    p.add_argument("--tree", default=None, help="tree preset, JSON file, choices or dynamic[:N]")
    p.add_argument("--prompt", "-p", default="Hello", help="message to the model ('-' reads stdin)")
    p.add_argument("--ignore-chat-template", action="store_true", help="use the raw prompt without the chat template")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--max-tokens", type=positive_int, default=128)
    p.add_argument("--no-medusa", action="store_true", help="one token per ring pass")
    p.add_argument("--temp", type=non_negative_float, default=0.0)
    p.add_argument("--top-p", type=probability, default=1.0)
    p.add_argument("--seed", type=non_negative_int, default=None)
    p.add_argument("--max-kv-size", type=kv_window, default=None, help="committed KV window per request (rotating)")
    p.add_argument("--memory-gb", default=None,
                   help="comma-separated memory per node: layers split in proportion (default: evenly)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port, default=0, help="first node's port, the others follow (0: any free)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads per node")
    p.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT_S, help="seconds one pass may take")
    p.add_argument("--token", default=None,
                   help=f"shared secret the nodes require on every call (default: ${TOKEN_ENV}, else none)")
    p.add_argument("--log-dir", default=None, help="keep the nodes' logs here (default: a temporary folder, removed)")
    p.add_argument("--json", action="store_true", help="print one JSON object last on stdout")
    return p


def _csv(text: str, n: int, what: str, cast=str) -> list:
    items = [cast(x.strip()) for x in text.split(",") if x.strip()]
    if len(items) == 1:
        items *= n
    if len(items) != n:
        raise ValueError(f"--{what}: {len(items)} values for {n} nodes; give one, or one per node")
    return items


def load_tokenizer(model: str):
    """The model folder's tokenizer with a streaming detokenizer and the config's EOS ids: mlx-lm's
    wrapper where MLX is installed, else the torch backend's (the same ids and text)."""
    from ..backends import resolve_backend
    from ..engine.downloader import LocalShardDownloader

    from ..core.model_files import read_config

    folder = LocalShardDownloader().model_path(model)
    if resolve_backend("auto") == "torch":
        from ..torch_compat.generate import load_tokenizer as torch_load_tokenizer

        return torch_load_tokenizer(folder)
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    return mlx_load_tokenizer(folder, eos_token_ids=read_config(folder).get("eos_token_id"))


def prepare(args) -> tuple[LocalRing, str]:
    """Every check that needs no node: flags, the prompt, the model folder; the ring, not started."""
    if not 0 <= args.port <= 65535 - max(args.nodes - 1, 0):
        raise ValueError(f"--port {args.port}: the {args.nodes} nodes' ports must fit in 0..65535")
    if args.timeout <= HOP_MARGIN_S * args.nodes:
        raise ValueError(f"--timeout {args.timeout} s leaves no time per hop: give more than "
                         f"{HOP_MARGIN_S * args.nodes:.1f} s for {args.nodes} nodes")
    text = read_prompt(args.prompt)
    backends = _csv(args.backends, args.nodes, "backends")
    try:
        weights = _csv(args.memory_gb, args.nodes, "memory-gb", positive_float) if args.memory_gb else None
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"--memory-gb: {e}") from None
    ring = LocalRing(backends, args.model, heads=args.heads, tree=args.tree, weights=weights, host=args.host,
                     port=args.port, threads=args.threads, max_kv_size=args.max_kv_size, log_dir=args.log_dir,
                     token=args.token or env_token())
    return ring, text


def room(model: str, prompt_tokens: int, max_tokens: int, max_kv_size: int | None) -> int:
    """``max_tokens``, cut to what the context leaves after the prompt when the cache keeps every token
    (the nodes refuse a pass past the context); a note says so."""
    from ..core.limits import Limits
    from ..core.model_files import config_context, read_config
    from ..engine.downloader import LocalShardDownloader

    context = config_context(read_config(LocalShardDownloader().model_path(model)))
    if context is None:
        return max_tokens
    Limits(context, max_kv_size).check_prompt(prompt_tokens)
    if max_kv_size is None and prompt_tokens + max_tokens > context:
        print(f"note: the model's context holds {context - prompt_tokens} tokens after the {prompt_tokens}-token "
              f"prompt: generating at most that many", file=sys.stderr)
        return context - prompt_tokens
    return max_tokens


def main(argv: list[str] | None = None) -> None:
    args = setup_arg_parser().parse_args(argv)
    try:
        ring, text = prepare(args)
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    # SIGTERM unwinds like Ctrl-C, so the finally below stops the nodes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    out = sys.stderr if args.json else sys.stdout
    try:
        t0 = time.perf_counter()
        ring.start()
        tokenizer = load_tokenizer(args.model)
        # Token ids with the template applied; raw text is encoded by the first node (exo's SendPrompt).
        prompt = apply_template(tokenizer, text, args.system_prompt, not args.ignore_chat_template)
        n_prompt = len(encode_prompt(tokenizer, prompt))
        max_tokens = room(args.model, n_prompt, args.max_tokens, args.max_kv_size)
        print(f"ring of {len(ring.nodes)} nodes ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for node, pid in zip(ring.nodes, ring.pids()):
            print(f"  {node.backend:5s} {node} pid {pid}", file=sys.stderr)
        if not args.no_medusa:
            print(ring.medusa(), file=sys.stderr)
        detok = tokenizer.detokenizer
        detok.reset()

        eos = eos_ids(tokenizer)

        def stream(tokens: list[int]) -> None:
            for t in tokens:
                if t not in eos:  # EOS is not text
                    detok.add_token(t)
            print(detok.last_segment, end="", file=out, flush=True)
            if stopped.is_set():  # Ctrl-C's KeyboardInterrupt was swallowed (inside gRPC or a finalizer)
                raise KeyboardInterrupt

        with ring.client(args.timeout) as client, interrupt_flag() as stopped:
            result = client.generate(prompt, max_tokens, not args.no_medusa,
                                     eos_token_ids=eos, temp=args.temp, top_p=args.top_p,
                                     seed=args.seed, on_tokens=stream)
        detok.finalize()
        print(detok.last_segment, file=out, flush=True)
    except (RingError, ValueError, FileNotFoundError) as e:
        fail(e)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    finally:
        ring.close()
    print_stats(result, sys.stderr)
    if args.json:
        tokens = result.tokens[:-1] if result.finish_reason == "stop" else result.tokens  # EOS is not text
        print(json.dumps({**result.to_dict(), "tokens": tokens, "text": tokenizer.decode(tokens),
                          "generation_tokens": len(result.tokens), "medusa": not args.no_medusa}))


def print_stats(result, file) -> None:
    print("=" * 10, file=file)
    print(f"Prompt: {len(result.prompt_tokens)} tokens, {result.prompt_s:.3f} s (first pass)", file=file)
    print(f"Generation: {len(result.tokens)} tokens, {result.generation_tps:.2f} tokens-per-sec, "
          f"{result.passes} passes, mean accepted length {result.mean_accepted:.2f}", file=file)
    print(f"Transport: {1000 * result.transport_s / (result.passes + 1):.2f} ms per pass", file=file)
    for t in result.nodes:
        per = 1000 / max(1, t.passes)
        print(f"  node {t.address} {t.backend:5s} layers {t.start_layer}-{t.end_layer}: compute "
              f"{t.compute_s * per:.2f} ms/pass, wire decode {t.decode_s * per:.2f} / encode "
              f"{t.encode_s * per:.2f} ms/pass", file=file)


if __name__ == "__main__":
    main()
