"""``mlx_medusa tune`` end to end on a tiny model: the tree file records the heads' calibration (fitted on
the held-out log-probabilities it saves beside the heads), ``--tree dynamic`` is checked against plain
decoding, and a model loaded with ``--tree dynamic`` builds its plan from the file."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from exo_medusa_mlx import tune
from exo_medusa_mlx.core.dynamic import DynamicTree
from exo_medusa_mlx.loading import load
from exo_medusa_mlx.training.loss import ranks_and_logprobs, target_ranks
from hostile import save_folder
from tiny import CONFIGS, random_heads, tiny_base


def test_ranks_and_logprobs():
    heads = random_heads(3)
    base = tiny_base()
    h = mx.random.normal((7, 64))
    targets = mx.array(np.random.default_rng(0).integers(-1, 96, (7, 3)))
    ranks, logp = (np.array(a) for a in ranks_and_logprobs(heads, base.lm_head, h, targets, k=5))
    assert np.array_equal(ranks, np.array(target_ranks(heads, base.lm_head, h, targets)))
    assert logp.shape == (7, 3, 5) and (np.diff(logp, axis=-1) <= 0).all() and (logp <= 0).all()
    full = np.array(heads.project(h, base.lm_head, base=False))  # (3, 7, V)
    want = -np.sort(-(full - np.log(np.exp(full).sum(-1, keepdims=True))), axis=-1)[..., :5]
    np.testing.assert_allclose(logp, want.transpose(1, 0, 2), atol=1e-5)


def test_tune_records_the_calibration_and_checks_dynamic(tmp_path, capsys):
    folder = save_folder(tmp_path / "m", CONFIGS["llama"], tiny_base(), random_heads(3))
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
