"""Run in exo 1.x's venv: every text card exo ships, its sampling defaults filled into a request as
exo's API fills them (``with_card_sampling_defaults``, with thinking on, off and unset), through
the Medusa engine's sampling set-up and one exact-sampling draw. Prints JSON: the cards
checked and the requests refused (each with its error)."""

from __future__ import annotations

import json

import anyio
import numpy as np
from exo.shared.models.model_cards import ModelTask, card_cache
from exo.shared.types.text_generation import InputMessage, InputMessageContent, TextGenerationTaskParams

from exo_medusa_mlx.core.processors import make_sampling_policy
from exo_medusa_mlx.core.tree import ROOT_ONLY
from exo_medusa_mlx.exo1.engine import exo_sampling

VOCAB = 64


def check(card, thinking: bool | None, rng: np.random.Generator) -> str | None:
    """None where the request is served, else why it was refused."""
    params = TextGenerationTaskParams(model=card.model_id, enable_thinking=thinking,
                                      input=[InputMessage(role="user", content=InputMessageContent("Hi"))])
    params = params.with_card_sampling_defaults()
    try:
        policy = make_sampling_policy(exo_sampling(params), [1, 2], 42)
        logits = rng.standard_normal((1, VOCAB)).astype(np.float32)
        token = int(policy.accept(ROOT_ONLY, np.zeros(1, dtype=np.int64), logits).tokens[0])
    except ValueError as e:
        return f"{card.model_id} (thinking {thinking}): {e}"
    return None if 0 <= token < VOCAB else f"{card.model_id}: drew token {token} of {VOCAB}"


async def main() -> None:
    await card_cache.refresh()
    cards = [c for c in card_cache.cc.values() if ModelTask.TextGeneration in c.tasks]
    rng = np.random.default_rng(0)
    refused = [why for c in cards for t in (None, True, False) if (why := check(c, t, rng)) is not None]
    with_top_k = sum(c.sampling_defaults.top_k is not None for c in cards)
    print(json.dumps({"cards": len(cards), "with_top_k": with_top_k, "refused": refused}))


if __name__ == "__main__":
    anyio.run(main)
