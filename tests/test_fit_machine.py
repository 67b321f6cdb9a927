"""A tree fitted to the machine at load time: a tree tuned here is kept with its product layout; a tree
tuned elsewhere is replaced by a few-second probe's pick (cached), never one slower than plain decoding."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from exo_medusa_mlx.core import latency  # noqa: E402
from exo_medusa_mlx.core.machine import this_machine  # noqa: E402
from exo_medusa_mlx.core.tree import build_tree  # noqa: E402
from exo_medusa_mlx.torch_compat.model import MedusaModel  # noqa: E402
from helpers.torch_models import CONFIGS, random_heads, random_model  # noqa: E402

ACC = [[0.6, 0.2, 0.1], [0.5, 0.2, 0.1], [0.4, 0.2, 0.1]]  # conditional accuracies, as a tune records them


@pytest.fixture(scope="module")
def model():
    return MedusaModel(random_model(CONFIGS["llama"]), random_heads(num_heads=3), build_tree([[0]]))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EXO_MEDUSA_CACHE", str(tmp_path))
    return tmp_path


def test_a_tree_tuned_here_keeps_its_layout(model, monkeypatch):
    monkeypatch.setattr(latency, "probe", lambda *a, **k: pytest.fail("tuned here: no probe"))
    facts = {"machine": this_machine(model.device), "rows_product": False, "head_conditional_accuracy": ACC}
    fitted = latency.fit_to_machine(model, facts, "heads")
    assert fitted.rows_product is False and fitted.tree is model.tree


def test_a_tree_tuned_elsewhere_is_probed_once(model, monkeypatch, cache, capsys):
    facts = {"machine": {"cpu": "elsewhere", "cores": 64, "device": "cuda:0"}, "head_conditional_accuracy": ACC}
    fitted = latency.fit_to_machine(model, facts, "heads")
    assert "probed" in capsys.readouterr().err
    assert fitted.tree.size <= latency.PROBE_NODES and list(cache.glob("probed/*.json"))
    monkeypatch.setattr(latency, "probe", lambda *a, **k: pytest.fail("the pick is cached"))
    again = latency.fit_to_machine(model, facts, "heads")
    assert again.tree.choices == fitted.tree.choices and again.rows_product == fitted.rows_product


def test_the_probe_never_picks_a_tree_slower_than_plain(model):
    # Heads that are never right: every tree costs more and accepts nothing, so the root alone wins.
    pick = latency.probe(model, np.zeros((3, 3)), max_nodes=4)
    assert pick["choices"] == [] and pick["predicted_speedup"] == pytest.approx(1.0)
    # Heads that are always right: a tree wins (the step costs less than the tokens it adds).
    assert latency.probe(model, np.array([[1.0, 0.0, 0.0]] * 3), max_nodes=4)["choices"]


def test_without_recorded_accuracies_the_model_is_kept(model):
    assert latency.fit_to_machine(model, {}, "heads") is model
