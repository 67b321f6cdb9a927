"""The torch fast path's static step on a CPU: what a CUDA graph replays, run eagerly.

Device-side step data (mask, positions, write slots from the committed length and
the tree's buffers) against the numpy ``SlotMap``; static decoding (one-gather
commits, request-sized and resized caches) against the dynamic step and
transformers' own greedy output; and the run a graph captures reads no host
state that changes per step. Needs no mlx.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from exo_medusa_mlx.core.accept import make_policy  # noqa: E402
from exo_medusa_mlx.core.step import generate_step  # noqa: E402
from exo_medusa_mlx.core.tree import ROOT_ONLY, build_tree, chain, load_tree  # noqa: E402
from exo_medusa_mlx.torch_compat import graphs, static  # noqa: E402
from exo_medusa_mlx.torch_compat.cache import CacheContext  # noqa: E402
from exo_medusa_mlx.torch_compat.graphs import GraphedVerifier, fast_verifier  # noqa: E402
from exo_medusa_mlx.torch_compat.model import MedusaModel  # noqa: E402
from exo_medusa_mlx.torch_compat.static import DeviceSteps, StaticVerifier, static_size  # noqa: E402
from helpers.graphs import CpuGraphed, StandInCapture  # noqa: E402
from test_torch_tiny import TorchOracleMedusa, hf_greedy, take  # noqa: E402
from torch_models import CONFIGS, random_heads, random_model  # noqa: E402

PROMPT = np.array([1, 5, 9, 3, 7, 2, 8, 11, 4])
N = 60  # tokens per run: through a 16-token window several times


@pytest.fixture(scope="module")
def base():
    return random_model(CONFIGS["llama"])


@pytest.fixture(scope="module")
def futures(base):
    """Plain greedy continuations: transformers' own, and the dynamic step's through a 16-token window."""
    windowed = take(generate_step(PROMPT, MedusaModel(base), max_kv_size=16, fast_path=False), N + 8)[0]
    return {None: np.concatenate([PROMPT, hf_greedy(base, PROMPT, N + 8)]), 16: np.concatenate([PROMPT, windowed])}


class Kept(TorchOracleMedusa):
    """Oracle heads (accepted deep, non-contiguous commits) that keep their last caches and count resizes."""

    def make_cache(self, *args, **kw):
        ctx, self.caches = super().make_cache(*args, **kw)
        return ctx, self.caches

    def make_batch_cache(self):  # without a fast path the sequence decodes as a batch of one
        ctx, self.caches = super().make_batch_cache()
        return ctx, self.caches

    def fast_verifier(self, ctx, caches, tree, policy, fast_path=None):
        self.verifier_used = super().fast_verifier(ctx, caches, tree, policy, fast_path)
        return self.verifier_used


@pytest.mark.parametrize("window,keep", [(None, 4), (7, 4), (16, 4), (12, 0)])
@pytest.mark.parametrize("tree", ["root", "cpu-8", "mc_sim_7b_63", "chain-5"])
def test_device_step_data_equals_the_slot_map(window, keep, tree):
    """Positions, write slots and mask computed on the device == ``SlotMap.plan_forward``'s,
    through random accepted paths (longer than a 7-slot window's ring: overwritten slots)."""
    buf = ROOT_ONLY if tree == "root" else load_tree(tree)
    ctx = CacheContext(window, keep)
    ctx.begin(n=len(PROMPT))
    ctx.commit([], np.arange(len(PROMPT)))
    steps = DeviceSteps(ctx, buf, torch.device("cpu"), torch.float32)
    rng = np.random.default_rng(0)
    for _ in range(40):
        steps.resize(static_size(ctx, buf.size))
        steps.send(rng.integers(0, 96, buf.size))
        steps.derive()
        plan = ctx.plan_forward(buf.depths, buf.mask)
        want = np.zeros((buf.size, len(steps.slots)), dtype=bool)
        want[:, : ctx.used + buf.size] = ctx.dense(plan.mask, buf.size)
        assert np.array_equal(ctx.positions.numpy()[0], plan.positions)
        assert np.array_equal(ctx.write.numpy(), ctx.used + np.arange(buf.size))
        assert np.array_equal(ctx.mask.numpy()[0, 0] == 0, want), ctx.committed
        path = buf.retrieve_indices[rng.integers(len(buf.retrieve_indices))]
        ctx.commit([], path[: rng.integers(1, (path >= 0).sum() + 1)])
    if window is not None:
        assert ctx.committed > 2 * window  # the window wrapped


@pytest.mark.parametrize("medusa,window", [(True, None), (True, 16), (False, None), (False, 16)])
def test_static_step_equals_dynamic_and_transformers(base, futures, medusa, window, monkeypatch):
    """Static decoding (fast_path=True on a CPU) == the dynamic step == transformers' generate, and
    its cache == the dynamic cache slot for slot; the cache grows several times on the way."""
    monkeypatch.setattr(static, "GROW", 8)
    monkeypatch.setattr(static, "BUCKET", 16)
    resizes = []
    real = static.StaticKV.resize
    monkeypatch.setattr(static.StaticKV, "resize", lambda self, S: (resizes.append(S), real(self, S))[1])
    runs = {}
    for fast in (False, True):
        model = Kept(base, random_heads(), load_tree("mc_sim_7b_63"), futures[window], ranks=(0, 1, 2))
        tree = None if medusa else ROOT_ONLY
        runs[fast] = model, take(generate_step(PROMPT, model, tree=tree, max_kv_size=window, fast_path=fast), N)
    (dyn, (want, dyn_steps)), (stat, (got, steps)) = runs[False], runs[True]
    assert isinstance(stat.verifier_used, StaticVerifier) and not isinstance(dyn.verifier_used, StaticVerifier)
    assert got == want and steps == dyn_steps
    assert got == list(futures[window][len(PROMPT):len(PROMPT) + N])
    if medusa:
        assert N / steps > 1.8, "oracle heads should be accepted deep into the tree"
    assert len(resizes) >= (1 if window else 3)
    used = stat.ctx.used
    assert used == dyn.ctx.used and np.array_equal(stat.ctx.slot_pos, dyn.ctx.slot_pos)
    for a, b in zip(stat.caches, dyn.caches):
        torch.testing.assert_close(a.keys[:, :, :used], b.keys[:, :, :used], rtol=0, atol=1e-5)
        torch.testing.assert_close(a.values[:, :, :used], b.values[:, :, :used], rtol=0, atol=1e-5)


@pytest.mark.parametrize("window", [None, 16, 1000])
def test_static_cache_is_sized_to_the_request(base, window, monkeypatch):
    """prompt + max tokens + the tree (or the window + the tree), rounded up to a bucket; never resized."""
    resizes = []
    real = static.StaticKV.resize
    monkeypatch.setattr(static.StaticKV, "resize", lambda self, S: (resizes.append(S), real(self, S))[1])
    model = MedusaModel(base, random_heads(), load_tree("cpu-8"))
    n = 40
    take(generate_step(PROMPT, model, max_kv_size=window, fast_path=True, max_tokens=n), n)
    most = len(PROMPT) + n if window is None else min(len(PROMPT) + n, window - 1)
    assert resizes == [-(-(most + model.tree.size) // static.BUCKET) * static.BUCKET]


@pytest.mark.parametrize("family", list(CONFIGS))
def test_static_step_on_each_family_and_chain(family):
    """A chain deeper than the tree presets and a tied-embedding family, against transformers."""
    tb = random_model(CONFIGS[family], seed=3)
    ref = hf_greedy(tb, PROMPT, 30)
    oracle = TorchOracleMedusa(tb, random_heads(), build_tree(chain(4)), np.concatenate([PROMPT, ref]))
    tokens, steps = take(generate_step(PROMPT, oracle, fast_path=True), 30)
    assert tokens == ref and 30 / steps > 2.5


class Frozen(CacheContext):
    """A context whose per-step host state may not be read: what a CUDA graph would freeze."""

    def __getattribute__(self, name):
        if name in ("committed", "slot_pos", "used"):
            raise AssertionError(f"the captured run read the host's ctx.{name}")
        return super().__getattribute__(name)


@pytest.mark.parametrize("family,window", [("llama", None), ("llama", 16), ("qwen3", 16)])
def test_the_run_a_graph_captures_reads_no_host_state(family, window, monkeypatch):
    real = StaticVerifier._run
    runs = [0]

    def frozen_run(self):
        cls = type(self.ctx)
        self.ctx.__class__ = Frozen
        try:
            runs[0] += 1
            return real(self)
        finally:
            self.ctx.__class__ = cls

    monkeypatch.setattr(StaticVerifier, "_run", frozen_run)
    model = MedusaModel(random_model(CONFIGS[family]), random_heads(), load_tree("mc_sim_7b_63"))
    want = take(generate_step(PROMPT, model, max_kv_size=window, fast_path=False), 30)
    assert take(generate_step(PROMPT, model, max_kv_size=window, fast_path=True), 30) == want
    assert runs[0] == want[1] - 1  # every verify step ran frozen (the first step is the prefill's)


def test_static_step_samples_as_the_dynamic_one(base):
    """needs_logits policies read the logits from the static step; the same seed draws the same
    tokens (logits equal up to float32 rounding: a draw may rarely land on a boundary)."""
    model = MedusaModel(base, random_heads(), load_tree("cpu-8"))
    same = sum(take(generate_step(PROMPT, model, make_policy(0.8, 0.9, "exact", s), fast_path=True), 12)
               == take(generate_step(PROMPT, model, make_policy(0.8, 0.9, "exact", s), fast_path=False), 12)
               for s in range(10))
    assert same >= 9


def test_fast_path_choice(base):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fast_verifier(cpu, None) is None and fast_verifier(cpu, False) is None
    assert fast_verifier(cpu, True) is StaticVerifier
    assert fast_verifier(cuda, None) is GraphedVerifier and fast_verifier(cuda, False) is None
    model = MedusaModel(base)
    ctx, caches = model.make_cache()
    with pytest.raises(ValueError, match="CUDA"):
        GraphedVerifier(model, ctx, caches, ROOT_ONLY, make_policy())


def test_graphed_verifier_on_a_stand_in_graph(base, monkeypatch):
    """``GraphedVerifier``'s flow on a CPU, a stand-in graph refilling the captured outputs on replay:
    one capture, another after each resize, and the dynamic step's tokens. (What a real graph
    freezes is tested above: the captured run reads no host state.)"""
    stand_in = StandInCapture()

    class Graphed(MedusaModel):
        def fast_verifier(self, ctx, caches, tree, policy, fast_path=None):
            return CpuGraphed(self, ctx, caches, tree, policy)

    resizes = []
    real = static.StaticKV.resize
    monkeypatch.setattr(static.StaticKV, "resize", lambda self, S: (resizes.append(S), real(self, S))[1])
    monkeypatch.setattr(graphs, "capture", stand_in)
    monkeypatch.setattr(static, "GROW", 8)
    monkeypatch.setattr(static, "BUCKET", 16)
    tree = load_tree("cpu-8")
    want = take(generate_step(PROMPT, MedusaModel(base, random_heads(), tree), fast_path=False), N)
    model = Graphed(base, random_heads(), tree)
    assert take(generate_step(PROMPT, model, fast_path=True), N) == want
    assert len(stand_in.captured) == len(resizes) >= 3  # the first verify, then one per resize (GROW 8: every few steps)
