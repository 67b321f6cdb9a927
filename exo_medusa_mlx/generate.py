"""``stream_generate`` / ``generate`` in mlx-lm's shape, and ``mlx_medusa generate``."""

from __future__ import annotations

import importlib.util
import sys
import time
from typing import Iterator

import mlx.core as mx

from .accept import make_policy
from .cache import DEFAULT_KEEP
from .decode import generate_step
from .model import MedusaModel
from .streaming import (  # noqa: F401  (re-exported: mlx-lm's names)
    DEFAULT_MAX_TOKENS,
    GenerationResponse,
    apply_template,
    check_request,
    collect,
    encode_prompt,
    print_stats,
    run_cli,
    setup_arg_parser,
    stream_steps,
)


def _peak_memory_gb() -> float:
    peak = mx.get_peak_memory()
    if peak == 0:  # some backends don't track; fall back to the process's peak RSS
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak / 1e9


def stream_generate(
    model: MedusaModel,
    tokenizer,
    prompt,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temp: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    medusa: bool = True,
    max_kv_size: int | None = None,
    keep: int = DEFAULT_KEEP,
    acceptance: str = "auto",
    tree=None,
) -> Iterator[GenerationResponse]:
    """Yield one response per generated token; stops at EOS or ``max_tokens``.

    Args:
        prompt: a string or token ids.
        medusa: False decodes plainly through the same code (the baseline).
        max_kv_size: committed-token window (sink ``keep`` tokens plus the most recent);
            None keeps every token.
        acceptance: "auto" (greedy at temp 0, exact sampling above), "greedy",
            "exact" or "typical" (the reference's heuristic).
        tree: override the model's tree for this call.
    """
    ids = encode_prompt(tokenizer, prompt)
    check_request(ids, getattr(model.base.args, "max_position_embeddings", None), max_tokens)
    policy = make_policy(temp, top_p, acceptance, seed)
    if tree is not None:
        model = model.with_tree(tree)
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    mx.reset_peak_memory()
    tic = time.perf_counter()
    steps = generate_step(ids, model, policy, medusa=medusa, max_kv_size=max_kv_size, keep=keep)
    yield from stream_steps(steps, len(ids), eos, tokenizer.detokenizer, max_tokens, _peak_memory_gb, tic)


def generate(model: MedusaModel, tokenizer, prompt, verbose: bool = False, **kwargs) -> str:
    """Generate a complete response; ``kwargs`` as ``stream_generate``."""
    return collect(stream_generate(model, tokenizer, prompt, **kwargs), verbose)


def _load(args, lazy: bool = False):
    from .loading import load

    dtype = getattr(mx, args.dtype) if args.dtype else None
    return load(args.model, heads=args.heads, tree=args.tree, dtype=dtype, lazy=lazy)


def main(argv=None) -> None:
    from . import distributed

    parser = setup_arg_parser()
    distributed.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.backend == "torch" or (args.backend == "auto" and importlib.util.find_spec("mlx") is None):
        from .torch_compat.generate import main as torch_main

        return torch_main(argv)
    if args.device:
        sys.exit("error: --device is for --backend torch; MLX uses its default device")
    extra = lambda model: {"backend": "mlx", "device": str(mx.default_device())}  # noqa: E731
    (distributed.run_cli if args.parallel else run_cli)(args, _load, stream_generate, extra)


if __name__ == "__main__":
    main()
