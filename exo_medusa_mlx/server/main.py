"""``mlx_medusa server``: mlx_lm.server's flags where they mean the same, plus Medusa's; uvicorn serves."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from .. import backends
from ..cli_args import KV_WINDOW, NON_NEGATIVE, NON_NEGATIVE_INT, PORT, POSITIVE, POSITIVE_INT, PROBABILITY
from ..core.batch_generation import DEFAULT_COMPLETION_BATCH
from ..core.budget import BatchBudget
from ..core.dynamic import DynamicTree

API_KEY_ENV = "MLX_MEDUSA_API_KEY"


def setup_arg_parser() -> argparse.ArgumentParser:
    """mlx_lm.server's flags where they mean the same; the numbers' types are the rules ``Settings``
    and ``Scheduler`` check their values with (``cli_args``)."""
    p = argparse.ArgumentParser(prog="mlx_medusa server", allow_abbrev=False,
                                description="OpenAI-compatible HTTP server with Medusa decoding.")
    p.add_argument("--backend", choices=["auto", "mlx", "torch"], default="auto",
                   help="auto: MLX where it is installed, else torch")
    p.add_argument("--model", default=None,
                   help="Local Hugging Face folder or repo id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--heads", default=None,
                   help="Medusa heads folder or file (default: shipped heads of the default model)")
    p.add_argument("--tree", default=None,
                   help="Tree preset (cpu-4..cpu-16, chain-N, mc_sim_7b_63), JSON file, dynamic[:N] (chosen every "
                        "step, at most N nodes), or best:N (the heads' best static tree of N nodes)")
    p.add_argument("--no-medusa", action="store_true", help="Plain decoding through the same code")
    p.add_argument("--host", default="127.0.0.1",
                   help="Address to bind (default 127.0.0.1; 0.0.0.0 serves the network)")
    p.add_argument("--port", type=PORT.parse, default=8080)
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"Require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}, else none)")
    p.add_argument("--max-tokens", type=POSITIVE_INT.parse, default=512,
                   help="Default max_tokens of a request that gives none")
    p.add_argument("--temp", type=NON_NEGATIVE.parse, default=0.0, help="Default temperature")
    p.add_argument("--top-p", type=PROBABILITY.parse, default=1.0, help="Default top_p")
    p.add_argument("--max-kv-size", type=KV_WINDOW.parse, default=None, help="Committed KV window per request (rotating)")
    p.add_argument("--decode-concurrency", type=POSITIVE_INT.parse, default=DEFAULT_COMPLETION_BATCH,
                   help="Requests decoded at once in one batch (1: one at a time); each request's tree shrinks as "
                        "the batch fills, by the batch latency 'mlx_medusa tune' measured")
    p.add_argument("--queue-size", type=NON_NEGATIVE_INT.parse, default=32,
                   help="Requests that may wait beyond those decoding; more are answered 503")
    p.add_argument("--request-timeout", type=POSITIVE.parse, default=300.0,
                   help="Seconds of generation per request; then it ends with finish_reason 'length'")
    p.add_argument("--max-body-bytes", type=POSITIVE_INT.parse, default=4 << 20,
                   help="Largest request body accepted (413 above)")
    p.add_argument("--allowed-origins", type=lambda s: tuple(x for x in s.split(",") if x), default=(),
                   help="Comma-separated origins for browser (CORS) access (default: none)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="Weights' dtype (default: float32 on CPU, bfloat16 on GPUs)")
    p.add_argument("--device", default=None, help="torch only: device (default cuda when available, else cpu)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    return p


def backend_api(args) -> tuple[Callable, Callable | None]:
    """(load() -> (model, tokenizer), worker exit hook) for ``--backend``."""
    backend = backends.resolve_backend(args.backend)
    if backend == "mlx" and args.device:
        raise ValueError("--device is for --backend torch; MLX uses its default device")
    return (lambda: backends.load(backend, args.model, args.heads, args.tree, args.dtype, args.device),
            backends.thread_exit(backend))


def make_server(scheduler, settings, host: str, port: int, log_level: str = "info"):
    """A uvicorn server for the app whose shutdown first ends the running and queued generations
    (their clients get a 503 error), so it need not wait for them or cancel their connections."""
    import uvicorn

    from .app import create_app

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            scheduler.cancel_all()
            await super().shutdown(sockets)

    return Server(uvicorn.Config(create_app(scheduler, settings), host=host, port=port, log_level=log_level,
                                 timeout_graceful_shutdown=5))


def main(argv: list[str] | None = None) -> None:
    args = setup_arg_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .app import Settings
    from .scheduler import Scheduler

    try:
        load, on_exit = backend_api(args)
        scheduler = Scheduler(load, args.queue_size, args.request_timeout, on_exit, args.decode_concurrency,
                              BatchBudget.for_model, medusa=not args.no_medusa, max_kv_size=args.max_kv_size)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    from ..default_model import DEFAULT_MODEL_ID

    settings = Settings(args.model or DEFAULT_MODEL_ID, args.api_key, args.max_body_bytes, args.max_tokens,
                        args.temp, args.top_p, args.allowed_origins)
    model = scheduler.model
    medusa = ("off" if args.no_medusa or model.heads is None else
              f"dynamic tree of at most {model.tree.size} nodes" if isinstance(model.tree, DynamicTree)
              else f"{model.tree.size}-node tree")
    logging.getLogger(__name__).info("serving %s (Medusa: %s; up to %d requests in one batch) on http://%s:%d",
                                     settings.model_id, medusa, args.decode_concurrency, args.host, args.port)
    try:
        make_server(scheduler, settings, args.host, args.port, args.log_level.lower()).run()
    finally:
        scheduler.close()


if __name__ == "__main__":
    main()
