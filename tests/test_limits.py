"""The model's limits (``core/limits.py``): each names the limit it enforces; prompt text too long for
any tokenization is refused before tokenizing; the engine protocol's checks take the model's limits.
Cancellation at the next chunk or layer is tested where it happens: ``test_slots.py``,
``test_step.py``, ``test_shard_engine.py``, ``test_worker.py``."""

from __future__ import annotations

import numpy as np
import pytest

from exo_medusa_mlx.core.limits import LimitError, Limits, check_prompt_text
from exo_medusa_mlx.engine import protocol as st
from exo_medusa_mlx.exo import Shard


def test_limits_name_the_limit():
    lim = Limits(context=512)
    lim.check_prompt(511)
    with pytest.raises(LimitError, match="prompt has 512 tokens, the model's context is 512"):
        lim.check_prompt(512)
    lim.check_pass(12, 500)
    with pytest.raises(LimitError, match="would fill positions 500..512, past the model's context of 512"):
        lim.check_pass(13, 500)
    Limits(512, window=64).check_pass(13, 10_000)  # a window: positions run on, the cache stays bounded
    with pytest.raises(LimitError, match="carries 600 tokens, more than the model's context of 512"):
        Limits(512, window=64).check_pass(600, 0)
    with pytest.raises(LimitError, match="300 nodes, more than the limit of 256"):
        lim.check_tree(300)
    Limits().check_pass(10**9, 10**9)  # no context known: nothing to refuse


def test_prompt_text_beyond_any_tokenization_is_refused_before_tokenizing():
    class Tok:
        def get_vocab(self):
            return {"a": 0, "abcdefghijklmnopqrst": 1}  # at most 20 characters per token

    check_prompt_text(Tok(), "x" * (10 * 20), 10)
    with pytest.raises(LimitError, match="201 characters: more than the model's context of 10 tokens"):
        check_prompt_text(Tok(), "x" * 201, 10)


def test_protocol_checks_take_the_models_limits():
    shard = Shard("m", 0, 1, 4)
    with pytest.raises(LimitError, match="the pass carries 600 tokens"):
        st.check_input(shard, np.zeros((1, 600), np.int64), 64, 96, Limits(512))
    with pytest.raises(LimitError, match="a tree of 300 nodes, more than the limit of 256"):
        st.parse_request({st.DEPTHS: np.arange(300)}, 300)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="must be a finite number >= 0"):
            st.parse_settings({st.TEMP: bad})
