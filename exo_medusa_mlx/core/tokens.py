"""Prompts as token ids and the ids that end an answer, as mlx-lm does it, for every surface.

Generation, the server, the ring client, training and tuning all call these, so a prompt
trained on and the same prompt asked at inference are the same ids. ``chat_ids`` follows
``mlx_lm.generate``: the chat template is rendered to text, then encoded without special
tokens (the template writes its own); a raw prompt is encoded with them unless it already
starts with the BOS token (``encode_prompt``, as ``mlx_lm.stream_generate``).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def has_chat_template(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """``messages`` in the tokenizer's chat template, ready for the assistant's answer (or, with
    ``add_generation_prompt=False``, a whole conversation to train on)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return list(tokenizer.encode(text, add_special_tokens=False))


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


def apply_template(tokenizer, prompt: str, system: str | None = None, use_template: bool = True):
    """The user message in the chat template (ids), or the raw prompt string where there is no
    template or ``use_template`` is False (``encode_prompt`` encodes it)."""
    if not use_template or not has_chat_template(tokenizer):
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return chat_ids(tokenizer, messages)


def prompt_ids(tokenizer, prompt: str | list[dict], system: str | None = None, use_template: bool = True) -> list[int]:
    """A user prompt as the model is asked it (``apply_template``), always as ids. A conversation
    (chat messages ending with the user's) goes through the template whole; without one, its
    messages' contents are the text."""
    if not isinstance(prompt, str):
        if use_template and has_chat_template(tokenizer):
            return chat_ids(tokenizer, prompt)
        prompt = "\n\n".join(m["content"] for m in prompt)
    return encode_prompt(tokenizer, apply_template(tokenizer, prompt, system, use_template)).tolist()


def eos_ids(tokenizer, also: Iterable[int] = ()) -> set[int]:
    """The ids that end an answer: the tokenizer's ``eos_token_ids`` where it has them (mlx-lm's
    wrapper: config.json's and the tokenizer's), else its ``eos_token_id`` and ``also`` (a
    model's generation config's); empty if there are none."""
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids is not None:
        return {int(i) for i in ids}
    one = getattr(tokenizer, "eos_token_id", None)
    return {int(i) for i in also} | ({int(one)} if one is not None else set())
