"""A tree fitted to the machine at load time: a tree tuned here is kept with its product layout; a tree
tuned elsewhere is replaced by a few-second probe's pick (cached), never one slower than plain decoding.
The probe cannot be fooled by load: timings are faked here (a script of plain-step and tree-step seconds
and a fake clock), none is measured."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("torch")

from exo_medusa_mlx.core import latency  # noqa: E402
from exo_medusa_mlx.core.machine import this_machine  # noqa: E402
from exo_medusa_mlx.core.tree import build_tree  # noqa: E402
from exo_medusa_mlx.torch_compat.model import MedusaModel  # noqa: E402
from torch_models import CONFIGS, random_heads, random_model  # noqa: E402

ACC = [[0.6, 0.2, 0.1], [0.5, 0.2, 0.1], [0.4, 0.2, 0.1]]  # conditional accuracies, as a tune records them
ELSEWHERE = {"machine": {"cpu": "elsewhere", "cores": 64, "device": "cuda:0"}, "head_conditional_accuracy": ACC}


@pytest.fixture(scope="module")
def model():
    return MedusaModel(random_model(CONFIGS["llama"]), random_heads(num_heads=3), build_tree([[0]]))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EXO_MEDUSA_CACHE", str(tmp_path))
    return tmp_path


class Machine:
    """Fake timings: ``plains`` are the plain-step seconds the probe measures, in order; a tree step of
    n nodes costs ``tree(n)``; each measurement advances a fake clock by ``takes`` seconds."""

    def __init__(self, monkeypatch, plains, tree=lambda n: 0.010 + 0.001 * n, takes: float = 1.0):
        self.plains, self.tree, self.takes, self.now, self.probes = list(plains), tree, takes, 0.0, 0
        monkeypatch.setattr(latency, "time", SimpleNamespace(perf_counter=lambda: self.now))
        monkeypatch.setattr(latency, "measure_plain_step", self.plain)
        monkeypatch.setattr(latency, "measure_latency", self.curve)
        real = latency.probe

        def counted(*a, **k):
            self.probes += 1
            return real(*a, **k)
        monkeypatch.setattr(latency, "probe", counted)

    def _spend(self, deadline):
        latency._check_deadline(deadline)
        self.now += self.takes

    def plain(self, model, *args, deadline=None, **kw):
        self._spend(deadline)
        return self.plains.pop(0)

    def curve(self, model, sizes, *args, deadline=None, **kw):
        self._spend(deadline)
        return {n: self.tree(n) for n in sizes}, 0.0


def test_a_tree_tuned_here_keeps_its_layout(model, monkeypatch):
    monkeypatch.setattr(latency, "probe", lambda *a, **k: pytest.fail("tuned here: no probe"))
    facts = {"machine": this_machine(model.device), "rows_product": False, "head_conditional_accuracy": ACC}
    fitted = latency.fit_to_machine(model, facts, "heads")
    assert fitted.rows_product is False and fitted.tree is model.tree


def test_a_tree_tuned_elsewhere_is_probed_once(model, monkeypatch, cache, capsys):
    m = Machine(monkeypatch, plains=[0.010, 0.010, 0.010])  # before, after; then the next load's quick check
    fitted = latency.fit_to_machine(model, ELSEWHERE, "heads")
    assert "probed" in capsys.readouterr().err
    assert 1 < fitted.tree.size <= latency.PROBE_NODES and list(cache.glob("probed/*.json"))
    again = latency.fit_to_machine(model, ELSEWHERE, "heads")
    assert m.probes == 1 and again.tree.choices == fitted.tree.choices and again.rows_product == fitted.rows_product


def test_the_probe_never_picks_a_tree_slower_than_plain(model, monkeypatch):
    # Heads that are never right: every tree costs more and accepts nothing, so the root alone wins.
    Machine(monkeypatch, plains=[0.010] * 4)
    pick = latency.probe(model, np.zeros((3, 3)), max_nodes=4)
    assert pick["choices"] == [] and pick["predicted_speedup"] == pytest.approx(1.0)
    # Heads that are always right: a tree wins (the step costs less than the tokens it adds).
    assert latency.probe(model, np.array([[1.0, 0.0, 0.0]] * 3), max_nodes=4)["choices"]


def test_timings_the_accepted_length_cannot_explain_are_measured_again(model, monkeypatch, capsys):
    """Seen under contention: plain steps timed 5x slower than the trees (83 s of probing, "predicted
    7.36x" for a tree expected to accept 1.40 tokens). Such a pick is discarded and measured again."""
    m = Machine(monkeypatch, plains=[0.050, 0.050, 0.010, 0.010])
    pick = latency.probe(model, ACC)
    err = capsys.readouterr().err
    assert "probe 1 discarded" in err and "cannot be right" in err and m.probes == 1
    assert pick["plain_step"] == pytest.approx(0.010)
    assert 1.0 <= pick["predicted_speedup"] <= pick["expected_accept_length"]


def test_load_that_moves_during_the_probe_discards_it(model, monkeypatch, capsys):
    Machine(monkeypatch, plains=[0.010, 0.020, 0.010, 0.011])
    pick = latency.probe(model, ACC)
    assert "load changed" in capsys.readouterr().err and pick["plain_step"] == pytest.approx(0.0105)


def test_a_probe_that_never_holds_together_is_not_cached(model, monkeypatch, cache, capsys):
    m = Machine(monkeypatch, plains=[0.050] * (2 * latency.PROBE_ATTEMPTS) * 2)
    assert latency.fit_to_machine(model, ELSEWHERE, "heads") is model  # the heads' own tree, not pinned
    assert "no consistent timing" in capsys.readouterr().err and not list(cache.glob("probed/*.json"))
    latency.fit_to_machine(model, ELSEWHERE, "heads")
    assert m.probes == 2  # the next load measures again


def test_the_probe_bounds_its_time(model, monkeypatch):
    """Each measurement takes 12 (fake) seconds: the probe stops at its budget, one measurement past it
    at most, and returns None (nothing trusted)."""
    m = Machine(monkeypatch, plains=[0.050, 0.050] * 10, takes=12.0)
    assert latency.probe(model, ACC, budget_s=30.0) is None
    assert m.now <= 30.0 + 12.0


@pytest.mark.parametrize("now,probes", [(0.011, 1), (0.020, 2), (0.005, 2)])
def test_a_cached_pick_is_measured_again_when_the_machine_moved(model, monkeypatch, capsys, now, probes):
    m = Machine(monkeypatch, plains=[0.010, 0.010, now, 0.010, 0.010])
    latency.fit_to_machine(model, ELSEWHERE, "heads")
    latency.fit_to_machine(model, ELSEWHERE, "heads")
    assert m.probes == probes
    assert ("probing again" in capsys.readouterr().err) == (probes == 2)


def test_without_recorded_accuracies_the_model_is_kept(model):
    assert latency.fit_to_machine(model, {}, "heads") is model
