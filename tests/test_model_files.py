"""Model files checked by their headers (``core/model_files.py``): a truncated weights file and a config
that is not an object are refused in one line; the context is read from any config layout."""

from __future__ import annotations

import json

import pytest

from exo_medusa_mlx.core.model_files import check_model_folder, check_safetensors, config_context
from helpers.folders import save_hf_folder
from helpers.tiny import N_LAYERS, tiny_base


def test_model_files_are_checked_by_their_headers(tmp_path):
    folder = save_hf_folder(tmp_path / "llama", "llama", tiny_base("llama", layers=N_LAYERS))
    weights = folder / "model.safetensors"
    assert any(name.startswith("model.layers.3.") for name in check_safetensors(weights))
    assert check_model_folder(folder)["num_hidden_layers"] == N_LAYERS
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(weights.read_bytes()[:-1])
    with pytest.raises(ValueError, match=f"is truncated: its tensors need {weights.stat().st_size} bytes"):
        check_safetensors(cut)
    # mlx-lm's args for some models (gemma, mixtral...) lack the context; the engine reads the config's.
    assert config_context({"max_position_embeddings": 8192}) == 8192
    assert config_context({"n_positions": 1024}) == 1024
    assert config_context({"text_config": {"max_position_embeddings": 4096}}) == 4096
    assert config_context({"max_position_embeddings": True}) is None
    (tmp_path / "config.json").write_text(json.dumps("a string"))
    with pytest.raises(ValueError, match="holds a JSON str, not an object"):
        check_model_folder(tmp_path)
