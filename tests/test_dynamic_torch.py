"""Dynamic trees on torch (no mlx): the eager step, the static step a CUDA graph replays (run eagerly on a
CPU) and ``GraphedVerifier``'s flow over a stand-in graph, one capture per tree size; all token-identical
to plain greedy decoding, with oracle heads accepted deep into trees whose shape changes every step."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from exo_medusa_mlx.core.dynamic import Calibration, make_dynamic  # noqa: E402
from exo_medusa_mlx.core.step import ROOT_ONLY, generate_step  # noqa: E402
from exo_medusa_mlx.torch_compat import graphs, static  # noqa: E402
from exo_medusa_mlx.torch_compat.model import MedusaModel  # noqa: E402
from helpers.graphs import CpuGraphed, StandInCapture  # noqa: E402
from oracle import OracleHeads, take, take_sized  # noqa: E402
from torch_models import CONFIGS, VOCAB, random_heads, random_model  # noqa: E402

torch.set_num_threads(1)
PROMPT = np.array([1, 5, 9, 3, 7, 2, 8, 11, 4])
N = 40


class Oracle(OracleHeads, MedusaModel):
    """Heads that know the plain greedy continuation (``oracle.OracleHeads``), as sure of it as a
    random draw says (their logits scaled), so the trees change size from step to step."""

    def project(self, h, depth=None):
        rows = super().project(h, depth)
        rigged = self.rigged(rows.float().cpu().numpy(), h.dim() == 1)
        rigged[1:] *= self.rng.uniform(0.2, 1.5)
        return torch.from_numpy(rigged).to(rows)

    def node_positions(self, caches, T):
        return caches.ctx.positions.reshape(-1).cpu().numpy()


def plan(n: int = 12, slope: float = 0.06):
    # The rigged heads put <= 0.1 on their top guess: calibrated up, trees of 8 or 12 nodes.
    return make_dynamic(n, 4, VOCAB, 1 + slope * np.maximum(np.arange(n + 1) - 1, 0),
                        Calibration((1.0, 1.0, 0.5, 0.0), (1.0,) * 4))


@pytest.fixture(scope="module")
def base():
    return random_model(CONFIGS["llama"])


@pytest.fixture(scope="module")
def plain(base):
    return take(generate_step(PROMPT, MedusaModel(base), tree=ROOT_ONLY), N + 8)[0]


def run(model, **kw) -> tuple[list[int], list[int]]:
    return take_sized(generate_step(PROMPT, model, **kw), N)


@pytest.mark.parametrize("window", [None, 16])
def test_eager_and_static_steps_equal_plain_decoding(base, plain, window, monkeypatch):
    monkeypatch.setattr(static, "GROW", 8)  # the static cache is resized on the way
    monkeypatch.setattr(static, "BUCKET", 16)
    want = plain if window is None else take(generate_step(PROMPT, MedusaModel(base), tree=ROOT_ONLY,
                                                           max_kv_size=window), N)[0]
    future = np.concatenate([PROMPT, want])
    runs = {}
    for fast in (False, True):
        model = Oracle(base, random_heads(), ROOT_ONLY, future, ranks=(0, 0, 1, 3))
        model.tree = plan()
        runs[fast] = run(model, max_kv_size=window, fast_path=fast)
    (eager, sizes), (fast, fast_sizes) = runs[False], runs[True]
    assert eager == fast == want[:N]
    assert sizes == fast_sizes and len(set(sizes)) >= 2 and N / (len(sizes) + 1) > 1.8, sizes


def test_graphed_flow_captures_once_per_tree_size(base, plain, monkeypatch):
    stand_in = StandInCapture()

    class Graphed(Oracle):
        def fast_verifier(self, ctx, caches, tree, policy, fast_path=None):
            self.used = CpuGraphed(self, ctx, caches, tree, policy)
            return self.used

    monkeypatch.setattr(graphs, "capture", stand_in)
    model = Graphed(base, random_heads(), ROOT_ONLY, np.concatenate([PROMPT, plain]), ranks=(0, 0, 1, 3))
    model.tree = plan()
    tokens, sizes = run(model, fast_path=True)
    assert tokens == plain[:N]
    # One graph per tree size (the cache is not resized here).
    assert len(stand_in.captured) == len(set(sizes)) == len(model.used.replays) >= 2


def test_scores_equal_mlx(tmp_path):
    """The same heads on both backends score the superset alike."""
    pytest.importorskip("mlx")
    import mlx.core as mx

    from exo_medusa_mlx.heads import load_heads as mlx_heads
    from exo_medusa_mlx.model import MedusaModel as MLXModel
    from exo_medusa_mlx.torch_compat.heads import load_heads
    from test_torch_tiny import save_hf_folder, torch_base
    from tiny import random_heads as mlx_random, tiny_base

    mbase = tiny_base("llama")
    folder = mlx_random(3, next_token=True).save(tmp_path / "heads")
    tb = torch_base(save_hf_folder(mbase, "llama", tmp_path / "base"))
    p = make_dynamic(16, 3, VOCAB, calibration=Calibration((0.4, 0.2, 0.0), (1.1, 0.9, 1.0)))
    h = np.random.default_rng(0).normal(size=(6, 64)).astype(np.float32)
    ours = [np.array(a) for a in MLXModel(mbase, mlx_heads(folder, 64, VOCAB)).propose_scored(mx.array(h), p)]
    theirs = [a.numpy() for a in MedusaModel(tb, load_heads(folder, 64, VOCAB)).propose_scored(torch.from_numpy(h), p)]
    assert np.array_equal(ours[1], theirs[1])
    np.testing.assert_allclose(ours[2], theirs[2], atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: real CUDA graphs are GPU-only (their flow "
                    "is tested above on a CPU)")
def test_real_graphs_equal_eager_on_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False
    base = random_model(CONFIGS["llama"], device="cuda")
    model = MedusaModel(base, random_heads().cuda(), plan())
    eager = take(generate_step(PROMPT, model, fast_path=False), 48)[0]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture falls back to eager with a warning
        assert take(generate_step(PROMPT, model, fast_path=True), 48)[0] == eager
