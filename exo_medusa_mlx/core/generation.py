"""``stream_generate`` / ``generate`` in mlx-lm's shape, for either backend's model (no mlx, no torch).

``generate_step`` (``core/step.py``) yields ``Step``s, the tokens each verification
step emits; ``stream_steps`` turns them into one ``GenerationResponse`` per token,
stopping at EOS or ``max_tokens`` inside a step. The model supplies what differs
by backend: its config's ``eos_token_ids``, ``detokenizer``, ``max_context`` and its memory counters.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from .accept import make_policy
from .limits import Limits, check_prompt_text
from .slots import DEFAULT_KEEP
from .step import ROOT_ONLY, Step, generate_step
from .tokens import encode_prompt, eos_ids
from .stops import StopMatcher

DEFAULT_MAX_TOKENS = 256


@dataclass
class GenerationResponse:
    text: str  # the new text piece
    token: int
    accepted: int  # tokens emitted by this token's verification step
    finish_reason: str | None  # "stop" (EOS), "length" (max_tokens or the context full), or None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    steps: int  # verification steps so far
    mean_accepted: float  # tokens per verification step so far
    mean_tree_size: float = 0.0  # tree nodes verified per verification step so far (a dynamic tree's vary)


def check_request(ids: np.ndarray, context: int | None, max_tokens: int, max_kv_size: int | None = None,
                  keep: int = DEFAULT_KEEP) -> None:
    """The request against the model's limits, before any work: the prompt leaves room in the
    context (``LimitError``), the window holds the sink tokens and one more."""
    Limits(context, max_kv_size).check_prompt(len(ids))
    if max_tokens < 1:
        raise ValueError(f"max_tokens {max_tokens} must be at least 1")
    if max_kv_size is not None and max_kv_size < keep + 2:
        raise ValueError(f"max_kv_size {max_kv_size} is too small: it must be at least keep + 2 = {keep + 2}")


class TokenText:
    """One request's tokens as text deltas, and when it ends: EOS ("stop"), ``max_tokens``
    ("length") or one of the ``stops`` strings ("stop": found across token boundaries, never emitted)."""

    def __init__(self, detok, eos: set[int], max_tokens: int, stops: list[str] | None = None):
        detok.reset()
        self.detok, self.eos, self.max_tokens = detok, eos, max_tokens
        self.stops = StopMatcher(stops) if stops else None
        self.n = 0  # tokens generated (EOS not counted)

    def add(self, tok: int, ends: str | None = None) -> tuple[str, str | None]:
        """The text ``tok`` adds, and the finish reason (None: the request goes on).

        ``ends``: the reason the sequence ends after ``tok`` whatever it is ("length": it fills
        the model's context, ``Step.finish``)."""
        finish = None
        if tok in self.eos:
            finish = "stop"
        else:
            self.detok.add_token(tok)
            self.n += 1
            finish = "length" if self.n == self.max_tokens else ends
        if finish:
            self.detok.finalize()
        text = self.detok.last_segment
        if self.stops is not None:
            text, hit = self.stops.feed(text)
            if hit:
                finish = "stop"
            elif finish:
                text += self.stops.flush()
        return text, finish

    def end(self) -> str:
        """The text still held back, when the request ends for another reason (a limit)."""
        self.detok.finalize()
        text = self.detok.last_segment
        return text + self.stops.flush() if self.stops is not None else text


def stream_steps(steps: Iterable[Step], prompt_tokens: int, eos: set[int], detok, max_tokens: int,
                 peak_memory: Callable[[], float], tic: float) -> Iterator[GenerationResponse]:
    """One response per token from a step generator, until EOS, ``max_tokens`` or the context's
    end (the last step's ``finish``); ``tic`` is when the prefill began."""
    out = TokenText(detok, eos, max_tokens)
    n_steps, n_verified, n_nodes, prompt_tps, gen_start = 0, 0, 0, 0.0, tic
    for step in steps:
        if step.tree_size == 0:
            prompt_tps = prompt_tokens / max(time.perf_counter() - tic, 1e-9)
            gen_start = time.perf_counter()
        else:
            n_steps += 1
            n_verified += len(step.tokens)
            n_nodes += step.tree_size
        for i, tok in enumerate(step.tokens):
            text, finish = out.add(tok, step.finish if i == len(step.tokens) - 1 else None)
            n = out.n
            elapsed = max(time.perf_counter() - gen_start, 1e-9)
            yield GenerationResponse(
                text=text, token=tok, accepted=len(step.tokens), finish_reason=finish,
                prompt_tokens=prompt_tokens, prompt_tps=prompt_tps, generation_tokens=n,
                # The first token comes from the prefill, as in mlx-lm's count.
                generation_tps=(n - 1) / elapsed if n > 1 else 0.0,
                peak_memory=peak_memory(), steps=n_steps,
                mean_accepted=n_verified / n_steps if n_steps else 0.0,
                mean_tree_size=n_nodes / n_steps if n_steps else 0.0,
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
    print(f"Medusa: {r.mean_accepted:.2f} tokens per step over {r.steps} steps, "
          f"{r.mean_tree_size:.2f} tree nodes per step", file=file)
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=file)


def stream_generate(model, tokenizer, prompt, max_tokens: int = DEFAULT_MAX_TOKENS, temp: float = 0.0,
                    top_p: float = 1.0, seed: int | None = None, medusa: bool = True,
                    max_kv_size: int | None = None, keep: int = DEFAULT_KEEP, acceptance: str = "auto",
                    tree=None, check=None) -> Iterator[GenerationResponse]:
    """Yield one response per generated token; stops at EOS or ``max_tokens``.

    Args:
        model, tokenizer: from either backend's ``load``.
        prompt: a string or token ids.
        medusa: False decodes plainly through the same code (the baseline).
        max_kv_size: committed-token window (sink ``keep`` tokens plus the most recent);
            None keeps every token.
        acceptance: "auto" (greedy at temp 0, exact sampling above), "greedy",
            "exact" or "typical" (the reference's heuristic).
        tree: override the model's tree for this call.
        check: called between prefill chunks; raises to stop (a server's cancelled request).
    """
    check_prompt_text(tokenizer, prompt, model.max_context)  # before tokenizing megabytes
    ids = encode_prompt(tokenizer, prompt)
    check_request(ids, model.max_context, max_tokens, max_kv_size, keep)
    policy = make_policy(temp, top_p, acceptance, seed)
    if tree is not None:
        model = model.with_tree(tree)
    model.reset_peak_memory()
    tic = time.perf_counter()
    steps = generate_step(ids, model, policy, max_kv_size=max_kv_size, keep=keep,
                          tree=None if medusa else ROOT_ONLY, max_tokens=max_tokens, check=check)
    yield from stream_steps(steps, len(ids), eos_ids(tokenizer, model.eos_token_ids), model.detokenizer(tokenizer),
                            max_tokens, model.peak_memory_gb, tic)


def generate(model, tokenizer, prompt, verbose: bool = False, **kwargs) -> str:
    """Generate a complete response; ``kwargs`` as ``stream_generate``."""
    return collect(stream_generate(model, tokenizer, prompt, **kwargs), verbose)
