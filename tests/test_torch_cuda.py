"""CUDA graphs for the verify step: the same tokens as eager decoding and transformers' generate.

Needs no mlx (NVIDIA nodes have none): models come from transformers configs.
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from exo_medusa_mlx.core.heads_format import MedusaConfig  # noqa: E402
from exo_medusa_mlx.core.step import generate_step  # noqa: E402
from exo_medusa_mlx.torch_compat.graphs import GraphedVerifier  # noqa: E402
from exo_medusa_mlx.torch_compat.heads import MedusaHeads  # noqa: E402
from exo_medusa_mlx.torch_compat.model import MedusaModel  # noqa: E402
from exo_medusa_mlx.core.tree import ROOT_ONLY, build_tree, tree_choices  # noqa: E402
from test_torch_tiny import TorchOracleMedusa, hf_greedy, take  # noqa: E402

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: CUDA graphs are GPU-only (the static cache they replay is tested on CPU "
           "in test_torch_parity.py::test_static_cache_matches_dynamic)",
)
PROMPT = np.array([1, 5, 9, 3, 7, 2, 8, 11, 4])
_SMALL = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=96, max_position_embeddings=1024,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
CONFIGS = {
    "llama": dict(_SMALL, model_type="llama", tie_word_embeddings=False),
    "qwen3": dict(_SMALL, model_type="qwen3", tie_word_embeddings=True, head_dim=16),
}
# SmolLM2-135M's shape (the default model), with random weights: for timings.
SMOLLM2_SHAPE = dict(model_type="llama", hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                     num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                     max_position_embeddings=8192, rope_theta=100000.0, bos_token_id=None, eos_token_id=None,
                     pad_token_id=None)


def random_model(cfg: dict, dtype=torch.float32, seed: int = 0, scale: float = 2.0):
    """A transformers model from ``cfg`` on the GPU; weights ~ N(0, scale^2 / fan_in) for sharp logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(cfg)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        for name, p in base.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, scale / p.shape[1] ** 0.5)
    return base.to("cuda", dtype).eval()


def random_heads(hidden: int, vocab: int, num_heads: int = 4, seed: int = 1) -> MedusaHeads:
    heads = MedusaHeads(MedusaConfig(num_heads=num_heads, hidden_size=hidden, vocab_size=vocab))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0.0, 0.3)
    return heads


@pytest.fixture
def captures(monkeypatch):
    """Counts CUDA graph captures; a capture that falls back to eager fails the test."""
    count = [0]
    real = GraphedVerifier._capture

    def counting(self):
        count[0] += 1
        real(self)

    monkeypatch.setattr(GraphedVerifier, "_capture", counting)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield count


def test_graphs_refuse_a_cpu_model():
    from exo_medusa_mlx.torch_compat.graphs import use_graphs

    class Cpu:
        device = torch.device("cpu")

    assert use_graphs(Cpu(), None) is False
    with pytest.raises(ValueError, match="CUDA"):
        use_graphs(Cpu(), True)


@needs_cuda
@pytest.mark.parametrize("family", list(CONFIGS))
def test_graphs_equal_eager_and_hf_generate(family, captures):
    torch.backends.cuda.matmul.allow_tf32 = False
    base = random_model(CONFIGS[family])
    model = MedusaModel(base, random_heads(64, 96).cuda(), build_tree(tree_choices("mc_sim_7b_63")))
    ref = hf_greedy(base, PROMPT, 48)
    for medusa in (False, True):
        for window in (None, 16):
            eager = take(generate_step(PROMPT, model, tree=None if medusa else ROOT_ONLY, max_kv_size=window, fast_path=False), 48)[0]
            graphed = take(generate_step(PROMPT, model, tree=None if medusa else ROOT_ONLY, max_kv_size=window, fast_path=True), 48)[0]
            assert graphed == eager, (medusa, window)
            if window is None:
                assert graphed == ref, medusa
    assert captures[0] == 4  # one per run: nothing fell back to eager

    oracle = TorchOracleMedusa(base, model.heads, model.tree, np.concatenate([PROMPT, ref]), ranks=(0, 1, 2))
    tokens, steps = take(generate_step(PROMPT, oracle, fast_path=True), 48)
    assert tokens == ref and 48 / steps > 2.0


@needs_cuda
def test_graphs_recapture_when_the_cache_grows(captures):
    base = random_model(CONFIGS["llama"])
    model = MedusaModel(base)
    n = 600  # past the first static size (prompt + 256, rounded): the cache doubles, the graph is re-captured
    eager = take(generate_step(PROMPT, model, fast_path=False), n)[0]
    assert take(generate_step(PROMPT, model, fast_path=True), n)[0] == eager
    assert captures[0] >= 2


@needs_cuda
def test_graphs_speed_on_the_default_model_shape(captures):
    """Timings on SmolLM2-135M's shape (random weights), bf16; printed, and graphs must win."""
    base = random_model(SMOLLM2_SHAPE, torch.bfloat16, scale=1.0)
    heads = random_heads(576, 49152, num_heads=4).to("cuda", torch.bfloat16)
    prompt = np.arange(1, 65)
    n = 128
    runs = {"plain eager": (MedusaModel(base), False),
            "plain graphs": (MedusaModel(base), True),
            "medusa mc_sim_7b_63 graphs (random heads)":
                (MedusaModel(base, heads, build_tree(tree_choices("mc_sim_7b_63"))), True)}
    tps = {}
    for name, (model, graphs) in runs.items():
        gen = generate_step(prompt, model, fast_path=graphs)
        take(gen, 16)  # prefill, warm-up and capture: not timed (steady state below)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, steps = take(gen, n)
        torch.cuda.synchronize()
        tps[name] = n / (time.perf_counter() - t0)
        print(f"{torch.cuda.get_device_name()}: {name}: {tps[name]:.1f} tok/s, {n / steps:.2f} tokens/step")
    out = os.environ.get("OUT")
    if out:
        import json

        with open(os.path.join(out, "torch_cuda_speed.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "tokens": n, "tok_per_s": tps}, f, indent=1)
    assert tps["plain graphs"] > 1.5 * tps["plain eager"]
