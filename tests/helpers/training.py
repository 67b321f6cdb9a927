"""What the training tests share: random prompts, heads for the tiny base, and (fixtures, imported by
the modules that use them) the tiny base and a self-distilled cache built from it once per module."""

from __future__ import annotations

import numpy as np
import pytest

from exo_medusa_mlx.core.heads_format import MedusaConfig
from exo_medusa_mlx.model import base_lm_head
from exo_medusa_mlx.training.state_cache import build_cache
from exo_medusa_mlx.training.train import new_heads
from helpers.tiny import VOCAB, tiny_base

EOS = 3  # the tiny models' end of sequence in training data
K = 3  # heads trained on the cache


def random_prompts(n: int, seed: int = 0, prefix=()) -> list[list[int]]:
    """n prompts of 3..11 token ids (ids 4.. : never EOS), each after ``prefix``."""
    rng = np.random.default_rng(seed)
    return [list(prefix) + rng.integers(4, VOCAB, int(rng.integers(3, 12))).tolist() for _ in range(n)]


def tiny_heads(base, seed: int = 0, own: bool = False):
    """K fresh heads for ``base``, as ``mlx_medusa train`` starts them."""
    cfg = MedusaConfig(num_heads=K, hidden_size=base.args.hidden_size, vocab_size=VOCAB, own_lm_head=own)
    return new_heads(cfg, base.lm_head.weight, seed)


@pytest.fixture(scope="module")
def base():
    """The tiny llama the training tests distil from."""
    return tiny_base("llama")


@pytest.fixture(scope="module")
def cache(base, tmp_path_factory):
    """(folder, meta): 24 prompts self-distilled from ``base``, a fifth held out."""
    folder = tmp_path_factory.mktemp("cache")
    meta = build_cache(folder, base, base_lm_head(base), key="k", prompts=random_prompts(24), eos={EOS},
                       val_split=0.2, max_tokens=40, batch_size=6)
    return folder, meta
