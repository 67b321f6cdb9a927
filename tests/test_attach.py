"""``core/attach.py``: both backends' ``load`` and both shard engines attach heads and a tree one way:
the same heads (in the base model's dtype), the tree tuned beside them for the backend, the machine
fit where the model is whole (a probe only where the backend asks for one), and the weights' dtype."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlx.utils import tree_flatten

from exo_medusa_mlx.core import attach as attach_module
from exo_medusa_mlx.core.attach import check_tree, weights_dtype
from exo_medusa_mlx.core.tree import DEFAULT_TREE, ROOT_ONLY, tree_choices
from exo_medusa_mlx.engine.shard import Shard
from exo_medusa_mlx.loading import load
from helpers.folders import save_folder
from helpers.tiny import CONFIGS, random_heads, tiny_base

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

MLX_TREE, TORCH_TREE = [[0], [1], [0, 0]], [[0]]
LAYERS = CONFIGS["llama"]["num_hidden_layers"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny llama with next-token heads (a shard engine must then keep the embedding on the last
    shard) and a tree tuned beside them for each backend."""
    heads = random_heads(3, next_token=True)
    f = save_folder(tmp_path_factory.mktemp("attach") / "llama", CONFIGS["llama"], tiny_base("llama"), heads)
    (f / "medusa" / "tree.json").write_text(json.dumps({"choices": MLX_TREE}))
    (f / "medusa" / "tree.torch.json").write_text(json.dumps({"choices": TORCH_TREE}))
    return f


def mlx_shard(folder, **kw):
    from exo_medusa_mlx.engine.mlx_backend import load_shard_model

    return load_shard_model(Shard("tiny", 0, LAYERS - 1, LAYERS), folder, heads=folder / "medusa", **kw)[0]


def torch_shard(folder, **kw):
    from exo_medusa_mlx.engine.torch_backend import load_shard_model

    return load_shard_model(Shard("tiny", 1, LAYERS - 1, LAYERS), folder, heads=folder / "medusa", **kw)[0]


def torch_load(folder, **kw):
    from exo_medusa_mlx.torch_compat import load as load_torch

    return load_torch(str(folder), **kw)[0]


LOADERS = {"mlx load": lambda f, **kw: load(str(f), **kw)[0], "mlx shard": mlx_shard,
           "torch load": torch_load, "torch shard": torch_shard}


@pytest.fixture
def fits(monkeypatch):
    """Each ``fit_to_machine`` call's ``probe_here`` (the model is returned as it is)."""
    calls = []

    def record(model, facts, source, probe_here=True):
        calls.append(probe_here)
        return model

    monkeypatch.setattr(attach_module, "fit_to_machine", record)
    return calls


@pytest.mark.parametrize("how", LOADERS)
def test_every_loader_attaches_the_same_heads_and_the_backends_tuned_tree(folder, how, fits):
    model = LOADERS[how](folder)
    saved = random_heads(3, next_token=True).named_arrays()
    got = model.heads.named_arrays()
    assert sorted(got) == sorted(saved)
    for k in saved:
        np.testing.assert_allclose(got[k], saved[k], rtol=1e-6, atol=1e-7)
    assert model.tree.size == len(TORCH_TREE if how.startswith("torch") else MLX_TREE) + 1
    # The tree tuned here is fitted to the machine; only a whole torch model may probe.
    assert fits == [how == "torch load"]
    if how == "torch shard":  # the next-token heads read the embedding on the last shard
        assert not model.base.model.embed_tokens.weight.is_meta


@pytest.mark.parametrize("how", LOADERS)
def test_a_tree_given_is_used_as_it_is(folder, how, fits):
    assert LOADERS[how](folder, tree="cpu-4").tree.size == len(tree_choices("cpu-4")) + 1
    assert fits == []  # nothing to fit: the tree was asked for


def test_no_heads_means_the_root_alone_and_a_bad_tree_fails_before_loading(tmp_path):
    f = save_folder(tmp_path / "bare", CONFIGS["llama"], tiny_base("llama"))
    model, _ = load(str(f), tree="cpu-8")  # no heads: the tree is checked, then the root alone decodes
    assert model.heads is None and model.tree is ROOT_ONLY
    with pytest.raises(ValueError, match="nope"):
        load(str(tmp_path / "never-read"), tree="nope")  # refused before the (missing) model is looked for
    with pytest.raises(FileNotFoundError, match="missing.json"):
        check_tree(None, tmp_path / "missing.json", "mlx")
    assert check_tree(None, None, "mlx").size == len(tree_choices(DEFAULT_TREE)) + 1


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_heads_take_the_base_models_dtype(folder, dtype):
    model = load(str(folder), dtype=dtype)[0]
    base_dtype = model.base.model.norm.weight.dtype
    assert str(base_dtype).endswith(dtype)
    assert {v.dtype for _, v in tree_flatten(model.heads.parameters())} == {base_dtype}
    tmodel = torch_load(folder, dtype=dtype)
    assert {p.dtype for p in tmodel.heads.parameters()} == {getattr(torch, dtype)} == {tmodel.dtype}


def test_weights_dtype():
    assert weights_dtype(None, on_cpu=True, accelerator="bfloat16") == "float32"
    assert weights_dtype(None, on_cpu=False, accelerator="bfloat16") == "bfloat16"
    assert weights_dtype(None, on_cpu=False) is None  # MLX on a GPU: the checkpoint's own
    assert weights_dtype("float16", on_cpu=True) == "float16"
    with pytest.raises(ValueError, match="dtype 'float8' is not supported: use one of float32, float16, bfloat16"):
        weights_dtype("float8", on_cpu=True)
