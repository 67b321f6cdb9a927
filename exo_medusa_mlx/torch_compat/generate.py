"""``stream_generate`` / ``generate`` on torch, and ``mlx_medusa generate --backend torch``.

Same arguments, response fields and flags as ``exo_medusa_mlx.generate``; that
module imports mlx, so the small neutral helpers are repeated here.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..accept import make_policy
from .cache import DEFAULT_KEEP
from .decode import generate_step
from .model import MedusaModel

DEFAULT_MAX_TOKENS = 256
DEFAULT_PROMPT = "Hello"


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


class StreamingDetokenizer:
    """Text deltas from token ids, decoding only the tail since the last emitted text.

    A delta is held back while it ends in an incomplete UTF-8 sequence.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.prefix = 0  # start of the context window re-decoded with new tokens
        self.read = 0  # tokens whose text was emitted
        self._pending = ""

    def _tail(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        return decode(self.tokens[self.prefix : self.read]), decode(self.tokens[self.prefix :])

    def add_token(self, token: int) -> None:
        self.tokens.append(token)
        before, after = self._tail()
        if after.endswith("\ufffd"):
            return
        self._pending += after[len(before) :]
        self.prefix, self.read = self.read, len(self.tokens)

    def finalize(self) -> None:
        before, after = self._tail()
        self._pending += after[len(before) :]
        self.prefix = self.read = len(self.tokens)

    @property
    def last_segment(self) -> str:
        """The text since the last call."""
        out, self._pending = self._pending, ""
        return out


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


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

    Arguments as ``exo_medusa_mlx.generate.stream_generate``; ``tokenizer`` is a
    transformers tokenizer (or anything with ``encode``/``decode``).
    """
    ids = encode_prompt(tokenizer, prompt)
    ctx_len = getattr(model.base.config, "max_position_embeddings", None)
    if ctx_len and len(ids) >= ctx_len:
        raise ValueError(f"prompt has {len(ids)} tokens, the model's context is {ctx_len}: shorten the prompt")
    if max_tokens < 1:
        raise ValueError(f"max_tokens {max_tokens} must be at least 1")
    policy = make_policy(temp, top_p, acceptance, seed)
    if tree is not None:
        model = model.with_tree(tree)
    eos = set(model.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos.add(tokenizer.eos_token_id)
    detok = StreamingDetokenizer(tokenizer)

    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    tic = time.perf_counter()
    steps = generate_step(ids, model, policy, medusa=medusa, max_kv_size=max_kv_size, keep=keep)
    n, n_steps, prompt_tps, gen_start = 0, 0, 0.0, tic
    for step in steps:
        if step.tree_size == 0:
            prompt_tps = len(ids) / (time.perf_counter() - tic)
            gen_start = time.perf_counter()
        else:
            n_steps += 1
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
                prompt_tokens=len(ids), prompt_tps=prompt_tps, generation_tokens=n,
                # The first token comes from the prefill, as in mlx-lm's count.
                generation_tps=(n - 1) / elapsed if n > 1 else 0.0,
                peak_memory=_peak_memory_gb(model.device), steps=n_steps,
                mean_accepted=(n - 1) / n_steps if n_steps else 0.0,
            )
            if finish:
                return


def generate(model: MedusaModel, tokenizer, prompt, verbose: bool = False, **kwargs) -> str:
    """Generate a complete response; ``kwargs`` as ``stream_generate``."""
    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
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


def setup_arg_parser() -> argparse.ArgumentParser:
    """The MLX command's flags, plus ``--device`` and ``--dtype``."""
    p = argparse.ArgumentParser(prog="mlx_medusa generate --backend torch",
                                description="Generate text with Medusa decoding on PyTorch.")
    p.add_argument("--backend", choices=["torch"], default="torch", help="Always torch here (the dispatcher routes)")
    p.add_argument("--model", default=None, help="Local Hugging Face folder or repo id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--heads", default=None, help="Medusa heads folder or medusa_lm_head.{safetensors,pt} (default: shipped heads of the default model)")
    p.add_argument("--tree", default=None, help="Tree preset (cpu-4..cpu-16, chain-N, mc_sim_7b_63) or JSON file")
    p.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help="Message to the model ('-' reads stdin)")
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-kv-size", type=int, default=None, help="Committed KV window (rotating, 4 sink tokens)")
    p.add_argument("--acceptance", choices=["auto", "greedy", "exact", "typical"], default="auto")
    p.add_argument("--no-medusa", action="store_true", help="Plain decoding through the same code (the baseline)")
    p.add_argument("--ignore-chat-template", action="store_true", help="Use the raw prompt without the chat template")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--json", action="store_true", help="Print one JSON object with tokens and stats last on stdout")
    p.add_argument("--verbose", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="Weights' dtype (default: float32 on CPU, bfloat16 on CUDA)")
    return p


def apply_template(tokenizer, prompt: str, system: str | None, use_template: bool):
    if not use_template or getattr(tokenizer, "chat_template", None) is None:
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def main(argv: list[str] | None = None) -> None:
    args = setup_arg_parser().parse_args(argv)
    from .loading import load

    try:
        model, tokenizer = load(args.model, heads=args.heads, tree=args.tree, dtype=args.dtype, device=args.device)
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
            "backend": "torch", "device": str(model.device),
        }))


if __name__ == "__main__":
    main()
