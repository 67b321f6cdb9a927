"""CUDA graphs for the verify step: the same tokens as eager decoding and transformers' generate.

Needs no mlx (NVIDIA nodes have none): models come from transformers configs. The
static step these graphs replay is tested on a CPU in test_torch_static.py; timings
are printed by scripts/gpu_step_bench.py, never asserted here.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from exo_medusa_mlx.core.step import generate_step  # noqa: E402
from exo_medusa_mlx.core.tree import ROOT_ONLY, build_tree, tree_choices  # noqa: E402
from exo_medusa_mlx.torch_compat import graphs  # noqa: E402
from exo_medusa_mlx.torch_compat.graphs import GraphedVerifier  # noqa: E402
from exo_medusa_mlx.torch_compat.model import MedusaModel  # noqa: E402
from exo_medusa_mlx.torch_compat.static import StaticVerifier  # noqa: E402
from test_torch_tiny import TorchOracleMedusa, hf_greedy, take  # noqa: E402
from torch_models import CONFIGS, random_heads, random_model  # noqa: E402

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: CUDA graphs are GPU-only (the static step they replay is tested on CPU "
           "in test_torch_static.py)",
)
PROMPT = np.array([1, 5, 9, 3, 7, 2, 8, 11, 4])


@pytest.fixture
def captures(monkeypatch):
    """Counts CUDA graph captures; a capture that falls back to eager fails the test."""
    count = [0]
    real = graphs.capture

    def counting(fn):
        count[0] += 1
        return real(fn)

    monkeypatch.setattr(graphs, "capture", counting)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield count


class StaticOracle(TorchOracleMedusa):
    """Oracle heads rig their logits on the host, which a graph cannot hold: the static step, eager."""

    def fast_verifier(self, ctx, caches, tree, policy, fast_path=None):
        return StaticVerifier(self, ctx, caches, tree, policy)


@needs_cuda
@pytest.mark.parametrize("family", list(CONFIGS))
def test_graphs_equal_eager_and_hf_generate(family, captures):
    torch.backends.cuda.matmul.allow_tf32 = False
    base = random_model(CONFIGS[family], device="cuda")
    model = MedusaModel(base, random_heads().cuda(), build_tree(tree_choices("mc_sim_7b_63")))
    ref = hf_greedy(base, PROMPT, 48)
    for medusa in (False, True):
        for window in (None, 16):
            tree = None if medusa else ROOT_ONLY
            eager = take(generate_step(PROMPT, model, tree=tree, max_kv_size=window, fast_path=False), 48)[0]
            graphed = take(generate_step(PROMPT, model, tree=tree, max_kv_size=window, fast_path=True), 48)[0]
            sized = take(generate_step(PROMPT, model, tree=tree, max_kv_size=window, max_tokens=48), 48)[0]
            assert graphed == eager == sized, (medusa, window)
            if window is None:
                assert graphed == ref, medusa
    assert captures[0] == 8  # one per run: nothing fell back to eager

    oracle = StaticOracle(base, model.heads, model.tree, np.concatenate([PROMPT, ref]), ranks=(0, 1, 2))
    tokens, steps = take(generate_step(PROMPT, oracle, fast_path=True), 48)
    assert tokens == ref and 48 / steps > 2.0


@needs_cuda
def test_graphs_recapture_when_the_cache_grows(captures):
    base = random_model(CONFIGS["llama"], device="cuda")
    model = MedusaModel(base)
    n = 600  # past the first static size (prompt + GROW, rounded): the cache is resized, the graph re-captured
    eager = take(generate_step(PROMPT, model, fast_path=False), n)[0]
    assert take(generate_step(PROMPT, model, fast_path=True), n)[0] == eager
    assert captures[0] >= 2


@needs_cuda
@pytest.mark.parametrize("window", [None, 16])
def test_a_graphed_step_never_blocks_the_host(window, monkeypatch):
    """From the host's tokens to the verdict's copy back, and in a commit, nothing synchronizes:
    the inputs and the commit's indices reach the device through non-blocking copies."""
    base = random_model(CONFIGS["llama"], device="cuda")
    model = MedusaModel(base, random_heads().cuda(), build_tree(tree_choices("mc_sim_7b_63")))
    checked = [0]

    def strict(fn):
        def run(self, *args):
            if not self.replays:  # the first launch captures, which synchronizes on purpose
                return fn(self, *args)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(self, *args)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                checked[0] += 1
        return run

    monkeypatch.setattr(GraphedVerifier, "launch", strict(GraphedVerifier.launch))
    monkeypatch.setattr(GraphedVerifier, "commit", strict(GraphedVerifier.commit))
    want = take(generate_step(PROMPT, model, max_kv_size=window, fast_path=False), 40)[0]
    assert take(generate_step(PROMPT, model, max_kv_size=window, fast_path=True), 40)[0] == want
    assert checked[0] > 20
