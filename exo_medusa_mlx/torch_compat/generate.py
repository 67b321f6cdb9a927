"""``stream_generate`` / ``generate`` on torch, and ``mlx_medusa generate --backend torch``.

Same arguments, response fields and flags as ``exo_medusa_mlx.generate`` (both
built on ``exo_medusa_mlx.streaming``).
"""

from __future__ import annotations

import resource
import time
from typing import Iterator

import torch

from ..accept import make_policy
from ..streaming import (  # noqa: F401  (re-exported, as in the MLX module)
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
from .cache import DEFAULT_KEEP
from .decode import generate_step
from .model import MedusaModel


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
    check_request(ids, getattr(model.base.config, "max_position_embeddings", None), max_tokens)
    policy = make_policy(temp, top_p, acceptance, seed)
    if tree is not None:
        model = model.with_tree(tree)
    eos = set(model.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos.add(tokenizer.eos_token_id)
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    tic = time.perf_counter()
    steps = generate_step(ids, model, policy, medusa=medusa, max_kv_size=max_kv_size, keep=keep)
    yield from stream_steps(steps, len(ids), eos, StreamingDetokenizer(tokenizer), max_tokens,
                            lambda: _peak_memory_gb(model.device), tic)


def generate(model: MedusaModel, tokenizer, prompt, verbose: bool = False, **kwargs) -> str:
    """Generate a complete response; ``kwargs`` as ``stream_generate``."""
    return collect(stream_generate(model, tokenizer, prompt, **kwargs), verbose)


def _load(args):
    from .loading import load

    return load(args.model, heads=args.heads, tree=args.tree, dtype=args.dtype, device=args.device)


def main(argv: list[str] | None = None) -> None:
    args = setup_arg_parser("mlx_medusa generate --backend torch").parse_args(argv)
    run_cli(args, _load, stream_generate, lambda model: {"backend": "torch", "device": str(model.device)})


if __name__ == "__main__":
    main()
