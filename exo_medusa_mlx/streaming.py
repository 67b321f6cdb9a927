"""What both backends' ``stream_generate`` and ``mlx_medusa generate`` share (no mlx, no torch).

A backend's step generator yields ``Step``s (the tokens each verification step
emits); ``stream_steps`` turns them into one ``GenerationResponse`` per token,
stopping at EOS or ``max_tokens`` inside a step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

DEFAULT_MAX_TOKENS = 256
DEFAULT_PROMPT = "Hello"


@dataclass
class Step:
    tokens: list[int]  # emitted by this verification step (first step: the token after the prompt)
    tree_size: int  # tokens verified in this step's forward (0 for the prefill)


@dataclass
class GenerationResponse:
    text: str  # the new text piece
    token: int
    accepted: int  # tokens emitted by this token's verification step
    finish_reason: str | None  # "stop" (EOS), "length", or None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    steps: int  # verification steps so far
    mean_accepted: float  # tokens per verification step so far


def encode_prompt(tokenizer, prompt) -> np.ndarray:
    """A string (tokenised as mlx-lm does) or token ids, checked."""
    if isinstance(prompt, str):
        bos = getattr(tokenizer, "bos_token", None)
        ids = tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
    else:
        ids = prompt
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise ValueError("prompt is empty: give at least one token")
    return ids


def check_request(ids: np.ndarray, context: int | None, max_tokens: int) -> None:
    if context and len(ids) >= context:
        raise ValueError(f"prompt has {len(ids)} tokens, the model's context is {context}: shorten the prompt")
    if max_tokens < 1:
        raise ValueError(f"max_tokens {max_tokens} must be at least 1")


def stream_steps(steps: Iterable[Step], prompt_tokens: int, eos: set[int], detok, max_tokens: int,
                 peak_memory: Callable[[], float], tic: float) -> Iterator[GenerationResponse]:
    """One response per token from a step generator; ``tic`` is when the prefill began."""
    detok.reset()
    n, n_steps, n_verified, prompt_tps, gen_start = 0, 0, 0, 0.0, tic
    for step in steps:
        if step.tree_size == 0:
            prompt_tps = prompt_tokens / max(time.perf_counter() - tic, 1e-9)
            gen_start = time.perf_counter()
        else:
            n_steps += 1
            n_verified += len(step.tokens)
        for tok in step.tokens:
            finish = None
            if tok in eos:
                finish = "stop"
            else:
                detok.add_token(tok)
                n += 1
                if n == max_tokens:
                    finish = "length"
            if finish:
                detok.finalize()
            elapsed = max(time.perf_counter() - gen_start, 1e-9)
            yield GenerationResponse(
                text=detok.last_segment, token=tok, accepted=len(step.tokens), finish_reason=finish,
                prompt_tokens=prompt_tokens, prompt_tps=prompt_tps, generation_tokens=n,
                # The first token comes from the prefill, as in mlx-lm's count.
                generation_tps=(n - 1) / elapsed if n > 1 else 0.0,
                peak_memory=peak_memory(), steps=n_steps,
                mean_accepted=n_verified / n_steps if n_steps else 0.0,
            )
            if finish:
                return


def collect(responses: Iterable[GenerationResponse], verbose: bool = False) -> str:
    """``generate``'s body: the whole text, optionally streamed with a stats line."""
    text, last = "", None
    for last in responses:
        if verbose:
            print(last.text, end="", flush=True)
        text += last.text
    if verbose and last is not None:
        print()
        print_stats(last)
    return text


def print_stats(r: GenerationResponse, file=sys.stdout) -> None:
    print("=" * 10, file=file)
    print(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec", file=file)
    print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec", file=file)
    print(f"Medusa: {r.mean_accepted:.2f} tokens per step over {r.steps} steps", file=file)
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=file)


def apply_template(tokenizer, prompt: str, system: str | None, use_template: bool):
    """The user message in the chat template (ids), or the raw prompt string."""
    if not use_template or getattr(tokenizer, "chat_template", None) is None:
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return chat_ids(tokenizer, messages)


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Messages in the tokenizer's chat template, ready for the assistant's answer (ids)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def setup_arg_parser(prog: str = "mlx_medusa generate") -> argparse.ArgumentParser:
    """mlx_lm.generate's flags plus Medusa's; the same for both backends."""
    p = argparse.ArgumentParser(prog=prog, allow_abbrev=False, description="Generate text with Medusa decoding.")
    p.add_argument("--backend", choices=["auto", "mlx", "torch"], default="auto",
                   help="auto: MLX where it is installed, else torch")
    p.add_argument("--model", default=None, help="Local Hugging Face folder or repo id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--heads", default=None, help="Medusa heads folder or medusa_lm_head.{safetensors,pt} (default: shipped heads of the default model)")
    p.add_argument("--tree", default=None, help="Tree preset (cpu-4..cpu-16, chain-N, mc_sim_7b_63) or JSON file")
    p.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help="Message to the model ('-' reads stdin)")
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-kv-size", type=int, default=None, help="Committed KV window (rotating, 4 sink tokens)")
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


def run_cli(args, load: Callable, stream_generate: Callable, extra: Callable | None = None) -> None:
    """``mlx_medusa generate``'s body for a backend's ``load(args)`` and ``stream_generate``;
    ``extra(model)`` adds backend facts to the JSON."""
    try:
        model, tokenizer = load(args)
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        prompt = apply_template(tokenizer, prompt, args.system_prompt, not args.ignore_chat_template)
        out = sys.stderr if args.json else sys.stdout
        tokens, last = [], None
        for last in stream_generate(
            model, tokenizer, prompt, max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p,
            seed=args.seed, medusa=not args.no_medusa, max_kv_size=args.max_kv_size,
            acceptance=args.acceptance,
        ):
            tokens.append(last.token)
            if args.verbose:
                print(last.text, end="", flush=True, file=out)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if args.verbose:
        print(file=out)
        print_stats(last, file=out)
    if args.json:
        if last.finish_reason == "stop":
            tokens = tokens[:-1]  # the EOS token is not part of the text
        print(json.dumps({
            "tokens": tokens, "text": tokenizer.decode(tokens), "prompt_tokens": last.prompt_tokens,
            "generation_tokens": last.generation_tokens, "prompt_tps": last.prompt_tps,
            "generation_tps": last.generation_tps, "mean_accepted": last.mean_accepted, "steps": last.steps,
            "peak_memory_gb": last.peak_memory, "finish_reason": last.finish_reason,
            "medusa": (not args.no_medusa) and model.heads is not None, "tree_size": model.tree.size,
            **(extra(model) if extra else {}),
        }))
