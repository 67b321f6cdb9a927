"""The streaming API: EOS and max-tokens inside a step, bad input, response fields."""

import numpy as np
import pytest

from exo_medusa_mlx.generate import stream_generate
from exo_medusa_mlx.model import MedusaModel
from exo_medusa_mlx.core.tree import build_tree, tree_choices
from helpers.oracle import PROMPT
from helpers.tiny import OracleMedusa, mlx_lm_greedy, random_heads, tiny_base


class Detok:
    def reset(self):
        self.tokens, self.last_segment = [], ""

    def add_token(self, t):
        self.tokens.append(t)
        self.last_segment = f"<{t}>"

    def finalize(self):
        self.last_segment = ""


class FakeTokenizer:
    def __init__(self, eos):
        self.eos_token_ids = [eos]
        self.eos_token_id = eos
        self.detokenizer = Detok()
        self.bos_token = None

    def encode(self, text, add_special_tokens=True):
        return [int(x) for x in text.split()]


@pytest.fixture(scope="module")
def setup():
    base = tiny_base("llama")
    ref = mlx_lm_greedy(base, 30)
    model = OracleMedusa(base, random_heads(4), build_tree(tree_choices("chain-4")), np.concatenate([PROMPT, ref]))
    return model, ref


def test_stops_at_eos_inside_a_step(setup):
    model, ref = setup
    eos = ref[9]
    cut = ref.index(eos)
    out = list(stream_generate(model, FakeTokenizer(eos), PROMPT, max_tokens=100))
    assert [r.token for r in out] == ref[: cut + 1]
    assert out[-1].finish_reason == "stop" and all(r.finish_reason is None for r in out[:-1])
    assert max(r.accepted for r in out) > 1  # steps emitted several tokens, yet none past EOS


def test_max_tokens_inside_a_step(setup):
    model, ref = setup
    out = list(stream_generate(model, FakeTokenizer(-1), PROMPT, max_tokens=7))
    assert [r.token for r in out] == ref[:7]
    assert out[-1].finish_reason == "length" and out[-1].generation_tokens == 7
    last = out[-1]
    assert last.mean_accepted > 1 and last.steps >= 1 and last.peak_memory > 0


def test_string_prompt_and_no_medusa(setup):
    model, ref = setup
    text = " ".join(map(str, PROMPT))
    out = list(stream_generate(model, FakeTokenizer(-1), text, max_tokens=12, medusa=False))
    assert [r.token for r in out] == ref[:12]
    assert out[-1].mean_accepted == 1.0


def test_bad_inputs(setup):
    model, _ = setup
    tok = FakeTokenizer(-1)
    with pytest.raises(ValueError, match="prompt is empty"):
        list(stream_generate(model, tok, []))
    with pytest.raises(ValueError, match="context is 512"):
        list(stream_generate(model, tok, np.ones(600, dtype=int)))
    with pytest.raises(ValueError, match="max_tokens"):
        list(stream_generate(model, tok, PROMPT, max_tokens=0))
    with pytest.raises(ValueError, match="top-p"):
        list(stream_generate(model, tok, PROMPT, temp=0.5, top_p=0.0))
    with pytest.raises(ValueError, match="unknown tree"):
        list(stream_generate(model, tok, PROMPT, tree="bogus"))
    with pytest.raises(ValueError, match="max_kv_size 3 is too small"):
        list(stream_generate(model, tok, PROMPT, max_kv_size=3))


def test_tree_deeper_than_heads_rejected():
    with pytest.raises(ValueError, match="heads give 2 guesses"):
        MedusaModel(tiny_base("llama"), random_heads(2), build_tree(tree_choices("chain-3")))


def test_unsupported_architecture_rejected_at_load():
    import mlx_lm.models.gpt2 as gpt2

    args = gpt2.ModelArgs(model_type="gpt2", n_ctx=64, n_embd=32, n_head=2, n_layer=1, n_positions=64,
                          layer_norm_epsilon=1e-5, vocab_size=50)
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported"):
        MedusaModel(gpt2.Model(args), None, build_tree([]))
