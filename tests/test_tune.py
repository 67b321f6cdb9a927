"""Tree tuning: growth is deterministic and optimal under its model; shipped heads are lossless; ``mlx_medusa
tune`` end to end on a tiny model records the heads' calibration (fitted on the held-out log-probabilities it
saves beside the heads), checks ``--tree dynamic`` against plain decoding, and a model loaded with ``--tree
dynamic`` builds its plan from the file."""

import itertools
import json

import numpy as np
import pytest

from exo_medusa_mlx import tune
from exo_medusa_mlx.core.dynamic import DynamicTree
from exo_medusa_mlx.core.growth import (conditional_accuracy, empirical_accept_length, grow_tree, latency_table,
                                        topk_accuracy)
from exo_medusa_mlx.core.tree import build_tree
from exo_medusa_mlx.loading import load
from exo_medusa_mlx.training.prompts import DATA_DIR, read_prompts
from exo_medusa_mlx.tune import measure_latency
from helpers.folders import save_hf_folder
from helpers.tiny import random_heads, tiny_base

# Head accuracies shaped like trained heads': each rank and each depth less likely.
ACC = np.array([
    [0.60, 0.12, 0.05, 0.03, 0.02],
    [0.45, 0.10, 0.05, 0.03, 0.02],
    [0.35, 0.08, 0.04, 0.02, 0.01],
    [0.30, 0.07, 0.03, 0.02, 0.01],
])
FLAT = {1: 0.02, 64: 0.02}  # a GPU: 64 tokens cost what one does
STEEP = {n: 0.02 * (1 + 0.5 * (n - 1)) for n in range(1, 65)}  # a CPU: every token adds half a step


def _rate(choices, acc, lat):
    e = 1.0 + sum(np.prod([acc[d, r] for d, r in enumerate(p)]) for p in choices)
    return e / lat[len(choices) + 1]


def test_grow_tree_is_deterministic():
    a = grow_tree(ACC, STEEP, 16)
    assert a == grow_tree(ACC.copy(), dict(STEEP), 16)
    assert a == grow_tree(ACC, [STEEP[n] for n in range(1, 65)], 16)  # array form: element i is i+1 nodes
    tied = np.full((3, 4), 0.25)  # all ties: the order falls back to the paths
    assert grow_tree(tied, FLAT, 9) == grow_tree(tied, FLAT, 9)
    build_tree(grow_tree(tied, FLAT, 9))  # every parent present


def test_steep_latency_gives_small_tree_flat_gives_large():
    small, info_s = grow_tree(ACC, STEEP, 32, return_info=True)
    large, info_l = grow_tree(ACC, FLAT, 32, return_info=True)
    assert 1 <= len(small) + 1 <= 4
    assert len(large) + 1 == 32
    assert info_l["expected_accept_length"] > info_s["expected_accept_length"]
    assert info_s["speedup"] > 1.0
    # Steeper than any gain: plain decoding (the root alone) wins, unless a guess is required.
    assert grow_tree(ACC, {1: 1.0, 2: 2.0}, 16) == []
    assert grow_tree(ACC, {1: 1.0, 2: 2.0}, 16, min_nodes=2) == [[0]]
    with pytest.raises(ValueError, match="min_nodes"):
        grow_tree(ACC, FLAT, 4, min_nodes=5)


def test_grow_tree_is_optimal_over_all_small_trees():
    acc = ACC[:2, :3]
    lat = latency_table({1: 1.0, 2: 1.3, 4: 1.6, 8: 3.0}, 8)
    paths = [(r,) for r in range(3)] + [(a, b) for a in range(3) for b in range(3)]
    best = 1.0 / lat[1]
    for n in range(1, 8):
        for sub in itertools.combinations(paths, n):
            s = set(sub)
            if all(len(p) == 1 or p[:1] in s for p in sub):
                best = max(best, _rate(sub, acc, lat))
    got = grow_tree(acc, {1: 1.0, 2: 1.3, 4: 1.6, 8: 3.0}, 8)
    assert _rate(got, acc, lat) == pytest.approx(best)


def test_latency_table_interpolates_and_extends():
    t = latency_table({1: 1.0, 3: 2.0}, 5)
    np.testing.assert_allclose(t[1:], [1.0, 1.5, 2.0, 2.5, 3.0])
    with pytest.raises(ValueError, match="positive"):
        latency_table({1: 0.0}, 4)


def test_accuracy_tables():
    # rows: ranks of the target under heads 0, 1; -1 past the sequence end
    ranks = np.array([[0, 0], [0, 1], [1, 0], [2, -1], [0, 0], [5, 3]] * 10)
    top = topk_accuracy(ranks, 3)
    np.testing.assert_allclose(top[0], [0.5, 4 / 6, 5 / 6])
    cond = conditional_accuracy(ranks, 3, min_rows=1)
    np.testing.assert_allclose(cond[1], [2 / 3, 1 / 3, 0.0])  # given head 0 right: rows 0, 1, 4
    assert empirical_accept_length(ranks, [[0], [0, 0]]) == pytest.approx(1 + 0.5 + 2 / 6)


def test_measure_latency_on_tiny_model():
    from helpers.tiny import tiny_medusa

    curve, overhead = measure_latency(tiny_medusa(), [1, 2, 4, 8], context=16, repeats=2)
    assert sorted(curve) == [1, 2, 4, 8]
    vals = [curve[n] for n in sorted(curve)]
    assert all(v > 0 for v in vals) and vals == sorted(vals)
    assert overhead > 0
    from exo_medusa_mlx.tune import measure_gather

    assert np.isfinite(measure_gather(tiny_medusa(), tree_size=4, context=16, repeats=2))


def test_prompt_sets_are_disjoint():
    train = set(read_prompts(DATA_DIR / "train_prompts.json"))
    held = set(read_prompts(DATA_DIR / "heldout_prompts.json"))
    assert len(held) >= 30 and not train & held
    bench = DATA_DIR / "bench_prompts.json"
    if bench.is_file():
        data = json.loads(bench.read_text())
        items = data if isinstance(data, list) else data.get("prompts", [])
        texts = {x if isinstance(x, str) else json.dumps(x) for x in items}
        assert not texts & (train | held)


def test_shipped_heads_lossless_on_default_model():
    from exo_medusa_mlx.core.heads_format import SHIPPED_HEADS

    assert (SHIPPED_HEADS / "medusa_lm_head.safetensors").is_file(), f"shipped heads missing in {SHIPPED_HEADS}"
    from exo_medusa_mlx.generate import stream_generate
    from exo_medusa_mlx.core.tokens import prompt_ids

    model, tok = load()
    assert model.heads is not None and 2 <= model.tree.size <= 16  # the tuned tree.json is picked up
    info = json.loads((SHIPPED_HEADS / "config.json").read_text())["info"]
    assert info["val_top1"][0] > 0.15  # well above an untrained head's (~0.03)
    ids = prompt_ids(tok, "Write a short note to a friend about a trip to the seaside.")
    plain = [r.token for r in stream_generate(model, tok, ids, max_tokens=30, medusa=False)]
    runs = list(stream_generate(model, tok, ids, max_tokens=30))
    assert [r.token for r in runs] == plain
    assert runs[-1].mean_accepted > 1.1  # the heads are used and sometimes right
    # Lookahead greedy decoding (the GPU default), here on the CPU: the same tokens.
    from exo_medusa_mlx.core.step import generate_step

    out = []
    for step in generate_step(ids, model, fast_path=True):
        out += step.tokens
        if len(out) >= 30:
            break
    assert out[:30] == plain


def test_default_tree_per_backend(tmp_path):
    from exo_medusa_mlx.core.heads_format import default_tree_for
    from exo_medusa_mlx.core.tree import DEFAULT_TREE

    assert default_tree_for(tmp_path) == DEFAULT_TREE
    (tmp_path / "tree.json").write_text("{}")
    assert default_tree_for(tmp_path, "torch") == tmp_path / "tree.json"  # no torch tree: the tuned one
    (tmp_path / "tree.torch.json").write_text("{}")
    assert default_tree_for(tmp_path) == tmp_path / "tree.json"
    assert default_tree_for(tmp_path / "medusa_lm_head.safetensors", "torch") == tmp_path / "tree.torch.json"
    # Ring nodes take a tree tuned for a ring's per-pass cost first, for their backend first.
    assert default_tree_for(tmp_path, "torch", ring=True) == tmp_path / "tree.torch.json"
    (tmp_path / "tree.ring.json").write_text("{}")
    assert default_tree_for(tmp_path, "torch", ring=True) == tmp_path / "tree.ring.json"
    assert default_tree_for(tmp_path, "mlx") == tmp_path / "tree.json"  # a single process: not the ring's
    (tmp_path / "tree.ring.torch.json").write_text("{}")
    assert default_tree_for(tmp_path, "torch", ring=True) == tmp_path / "tree.ring.torch.json"


def test_gather_fraction_counts_commits_out_of_place():
    from exo_medusa_mlx.core.growth import gather_fraction

    # nodes: root 0, [0] 1, [1] 2, [0, 0] 3
    ranks = np.array([[0, 0], [0, 5], [1, 0], [3, 0], [-1, -1]])
    # kept: 0,1,3 (moved); 0,1 (in place); 0,2 (moved); 0 (in place); 0 (in place)
    assert gather_fraction(ranks, [[0], [1], [0, 0]]) == pytest.approx(2 / 5)
    assert gather_fraction(ranks, [[0], [0, 0]]) == 0.0  # a chain is always in place


def test_tune_records_the_calibration_and_checks_dynamic(tmp_path, capsys):
    folder = save_hf_folder(tmp_path / "m", "llama", tiny_base(), random_heads(3))
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([f"t{i} t{i + 1} t{i + 2}" for i in range(1, 40, 3)]))
    opts = tune.TuneOptions(model=str(folder), heads=str(folder / "medusa"), prompts=str(prompts),
                            cache_dir=str(tmp_path / "cache"), data_max_tokens=24, max_nodes=6, repeats=1,
                            num_prompts=2, max_tokens=12, tree="dynamic:6")
    result = tune.run(opts)
    saved = json.loads((folder / "medusa" / "tree.json").read_text())
    assert set(saved["calibration"]) == {"log_scale", "power"} and len(saved["calibration"]["power"]) == 3
    assert (folder / "medusa" / tune.LOGPROBS_FILE).is_file()
    assert result["measured_tree"]["identical"] == 2 and result["measured_tree"]["mean_tree_size"] >= 1
    assert "--tree dynamic:6" in capsys.readouterr().out
    model, _ = load(str(folder), heads=str(folder / "medusa"), tree="dynamic:6")
    assert isinstance(model.tree, DynamicTree)
    assert model.tree.calibration.log_scale == tuple(saved["calibration"]["log_scale"])
