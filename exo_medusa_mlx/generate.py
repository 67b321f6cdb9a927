"""``mlx_medusa generate``: mlx_lm.generate's habits on either backend; and mlx-lm's API names.

``stream_generate`` / ``generate`` take either backend's model (``core/generation.py``).
"""

from __future__ import annotations

import argparse
import json
import sys

from . import backends
from .cli_args import (
    DIST_TIMEOUT_S,
    PARALLEL_MODES,
    fail,
    interrupt_flag,
    kv_window,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    read_prompt,
)
from .core.batch_generation import BatchGenerator, batch_generate  # noqa: F401  (re-exported: mlx-lm's names)
from .core.generation import (  # noqa: F401  (re-exported: mlx-lm's names)
    DEFAULT_MAX_TOKENS,
    GenerationResponse,
    generate,
    print_stats,
    stream_generate,
)
from .core.tokens import apply_template

DEFAULT_PROMPT = "Hello"


def setup_arg_parser(prog: str = "mlx_medusa generate") -> argparse.ArgumentParser:
    """mlx_lm.generate's flags plus Medusa's; the same for both backends."""
    p = argparse.ArgumentParser(prog=prog, allow_abbrev=False, description="Generate text with Medusa decoding.")
    p.add_argument("--backend", choices=["auto", *backends.BACKENDS], default="auto",
                   help="auto: MLX where it is installed, else torch")
    p.add_argument("--model", default=None, help="Local Hugging Face folder or repo id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--heads", default=None, help="Medusa heads folder or medusa_lm_head.{safetensors,pt} (default: shipped heads of the default model)")
    p.add_argument("--tree", default=None,
                   help="Tree preset (cpu-4..cpu-16, chain-N, mc_sim_7b_63), JSON file, dynamic[:N] (chosen every "
                        "step, at most N nodes), or best:N (the heads' best static tree of N nodes)")
    p.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help="Message to the model ('-' reads stdin)")
    p.add_argument("--max-tokens", "-m", type=positive_int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--temp", type=non_negative_float, default=0.0)
    p.add_argument("--top-p", type=probability, default=1.0)
    p.add_argument("--seed", type=non_negative_int, default=None)
    p.add_argument("--max-kv-size", type=kv_window, default=None, help="Committed KV window (rotating, 4 sink tokens)")
    p.add_argument("--acceptance", choices=["auto", "greedy", "exact", "typical"], default="auto",
                   help="auto: greedy at --temp 0, exact speculative sampling above")
    p.add_argument("--no-medusa", action="store_true", help="Plain decoding through the same code (the baseline)")
    p.add_argument("--ignore-chat-template", action="store_true", help="Use the raw prompt without the chat template")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--json", action="store_true", help="Print one JSON object with tokens and stats last on stdout")
    p.add_argument("--verbose", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--device", default=None, help="torch only: device (default cuda when available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="Weights' dtype (default: float32 on CPU, bfloat16 on GPUs)")
    return p


def run(args, load=None, stream=stream_generate, extra=None) -> None:
    """Load on the chosen backend, stream the answer, print the stats (and the JSON).

    ``load(args)``, ``stream`` and ``extra(model)`` (facts for the JSON) replace the
    defaults under ``--parallel`` (``distributed.run_cli``). Errors are one line (exit 1);
    Ctrl-C exits 130 after printing what was generated."""
    backend = backends.resolve_backend(args.backend)
    if load is None:
        def load(a):
            return backends.load(backend, a.model, a.heads, a.tree, a.dtype, a.device)
    try:
        text = read_prompt(args.prompt)  # before minutes of loading
        try:
            model, tokenizer = load(args)
        except (RuntimeError, OSError) as e:  # the framework's own loaders: a corrupt or unreadable file
            raise ValueError(f"cannot load the model: {e}") from None
        prompt = apply_template(tokenizer, text, args.system_prompt, not args.ignore_chat_template)
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    except KeyboardInterrupt:
        print("error: interrupted before generating", file=sys.stderr)
        sys.exit(130)
    out = sys.stderr if args.json else sys.stdout
    tokens, last, interrupted = [], None, False
    with interrupt_flag() as stopped:
        try:
            for last in stream(
                model, tokenizer, prompt, max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p,
                seed=args.seed, medusa=not args.no_medusa, max_kv_size=args.max_kv_size,
                acceptance=args.acceptance,
            ):
                tokens.append(last.token)
                if args.verbose:
                    print(last.text, end="", flush=True, file=out)
                if stopped.is_set():  # the KeyboardInterrupt was swallowed (raised inside a __del__ or C code)
                    raise KeyboardInterrupt
        except ValueError as e:
            fail(e)
        except KeyboardInterrupt:
            interrupted = True
    if last is None:  # interrupted during the prefill
        print("\nerror: interrupted before the first token", file=sys.stderr)
        sys.exit(130)
    if args.verbose:
        print(file=out)
        print_stats(last, file=out)
    finish = "interrupted" if interrupted else last.finish_reason
    if args.json:
        if finish == "stop":
            tokens = tokens[:-1]  # the EOS token is not part of the text
        print(json.dumps({
            "tokens": tokens, "text": tokenizer.decode(tokens), "prompt_tokens": last.prompt_tokens,
            "generation_tokens": last.generation_tokens, "prompt_tps": last.prompt_tps,
            "generation_tps": last.generation_tps, "mean_accepted": last.mean_accepted, "steps": last.steps,
            "mean_tree_size": last.mean_tree_size, "peak_memory_gb": last.peak_memory, "finish_reason": finish,
            "medusa": (not args.no_medusa) and model.heads is not None, "tree_size": model.tree.size,
            "backend": backend, "device": str(model.device), **(extra(model) if extra else {}),
        }), flush=True)
    if interrupted:
        sys.exit(130)


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    """``--parallel`` and its options: ``distributed.py`` runs them (MLX, under ``mlx_medusa launch``)."""
    g = p.add_argument_group("distributed", "under 'mlx_medusa launch -n N -- generate ...' or mlx.launch")
    g.add_argument("--parallel", choices=PARALLEL_MODES, default=None,
                   help="split the model across the launched ranks: by layers (pipeline) or mlx-lm's tensor sharding")
    g.add_argument("--pipeline-split", default="even",
                   help="layers per rank: even, memory (in proportion to each rank's), or weights such as 2,1")
    g.add_argument("--dist-timeout", type=positive_float, default=DIST_TIMEOUT_S,
                   help="seconds a rank waits on the others before it fails with an error")


def main(argv: list[str] | None = None) -> None:
    parser = setup_arg_parser()
    add_parallel_arguments(parser)
    args = parser.parse_args(argv)
    if args.parallel:
        from . import distributed

        return distributed.run_cli(args, run)
    run(args)


if __name__ == "__main__":
    main()
