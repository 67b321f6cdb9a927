"""Registering our engines with exo 0.0.x (``exo/registry.py``, against a stand-in exo package written
here: names from the contract, no exo code), and the engines the ``exo`` package exports."""

from __future__ import annotations

import asyncio
import importlib
import sys

import pytest

import exo_medusa_mlx.exo as exo_pkg
from exo_medusa_mlx.exo import LocalShardDownloader, MedusaMLXInferenceEngine
from exo_medusa_mlx.exo.registry import register_with_exo


def test_engines_are_exported():
    assert exo_pkg.MedusaTorchInferenceEngine.__name__ == "MedusaTorchInferenceEngine"
    assert exo_pkg.MedusaMLXInferenceEngine.__name__ == "MedusaMLXInferenceEngine"


FAKE_EXO = {
    "exo/__init__.py": "",
    "exo/inference/__init__.py": "",
    "exo/inference/inference_engine.py": (
        'inference_engine_classes = {"mlx": "MLXDynamicShardInferenceEngine", "dummy": "DummyInferenceEngine"}\n'
        "def get_inference_engine(inference_engine_name, shard_downloader):\n"
        '    if inference_engine_name == "dummy":\n'
        '        return ("dummy", shard_downloader)\n'
        '    raise ValueError(f"unsupported engine {inference_engine_name}")\n'
    ),
    "exo/models.py": (
        'model_cards = {"llama-3.2-1b": {"layers": 16, "repo": {\n'
        '    "MLXDynamicShardInferenceEngine": "mlx-community/Llama-3.2-1B-Instruct-4bit",\n'
        '    "TinygradDynamicShardInferenceEngine": "unsloth/Llama-3.2-1B-Instruct"}}}\n'
    ),
    "exo/main.py": "from exo.inference.inference_engine import get_inference_engine\n",
    "exo/orchestration/__init__.py": "",
    "exo/orchestration/node.py": (
        "class Node:\n"
        "    def __init__(self, inference_engine):\n"
        "        self.inference_engine = inference_engine\n"
        "    async def select_best_inference_engine(self):\n"
        '        self.inference_engine = "rebuilt"\n'
    ),
}


@pytest.fixture
def fake_exo(tmp_path, monkeypatch):
    def install(files):
        for name, text in files.items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(text)
        monkeypatch.syspath_prepend(str(tmp_path))
        importlib.invalidate_caches()

    yield install
    for name in [m for m in sys.modules if m == "exo" or m.startswith("exo.")]:
        del sys.modules[name]


def test_register_is_a_clear_no_op_without_exo(monkeypatch):
    for name in [m for m in sys.modules if m == "exo" or m.startswith("exo.")]:  # stand-ins other tests loaded
        monkeypatch.delitem(sys.modules, name)
    if importlib.util.find_spec("exo") is not None:
        pytest.skip("an 'exo' package is installed here")
    reg = register_with_exo()
    assert not reg and "not installed" in reg.detail and reg.engines == ()


def test_register_refuses_an_unrelated_exo(fake_exo):
    fake_exo({"exo/__init__.py": ""})
    reg = register_with_exo()
    assert not reg and "not exo 0.0.x" in reg.detail


def test_register_with_exo(fake_exo):
    fake_exo(FAKE_EXO)
    import exo.main
    from exo.inference import inference_engine as ie
    from exo.models import model_cards
    from exo.orchestration.node import Node

    reg = register_with_exo()
    assert reg and {"medusa-mlx", "medusa-torch"} <= set(reg.engines)
    assert ie.inference_engine_classes["medusa-mlx"] == "MedusaMLXInferenceEngine"
    assert ie.inference_engine_classes["mlx"] == "MLXDynamicShardInferenceEngine"
    dl = LocalShardDownloader()
    for get in (ie.get_inference_engine, exo.main.get_inference_engine):
        engine = get("medusa-mlx", dl)
        assert isinstance(engine, MedusaMLXInferenceEngine) and engine.shard_downloader is dl
        assert get("dummy", dl) == ("dummy", dl)
    repo = model_cards["llama-3.2-1b"]["repo"]
    assert repo["MedusaMLXInferenceEngine"] == "mlx-community/Llama-3.2-1B-Instruct-4bit"
    assert repo["MedusaTorchInferenceEngine"] == "unsloth/Llama-3.2-1B-Instruct"
    assert model_cards["smollm2-135m"]["repo"]["MedusaMLXInferenceEngine"] == "HuggingFaceTB/SmolLM2-135M-Instruct"

    ours, theirs = Node(MedusaMLXInferenceEngine(dl)), Node("stock")
    asyncio.run(ours.select_best_inference_engine())
    asyncio.run(theirs.select_best_inference_engine())
    assert isinstance(ours.inference_engine, MedusaMLXInferenceEngine) and theirs.inference_engine == "rebuilt"

    wrapped = ie.get_inference_engine
    again = register_with_exo()
    assert again and ie.get_inference_engine is wrapped  # no double wrapping
    assert Node.select_best_inference_engine.__wrapped__.__name__ == "select_best_inference_engine"
