"""Shard, the inference_state protocol and wire format, the node hook, and exo registration
(against a stand-in exo package written here: names from the contract, no exo code)."""

from __future__ import annotations

import asyncio
import importlib
import json
import sys

import numpy as np
import pytest

import exo_medusa_mlx.exo as exo_pkg
from exo_medusa_mlx.exo import LocalShardDownloader, MedusaMLXInferenceEngine, Shard
from exo_medusa_mlx.engine import protocol as st
from exo_medusa_mlx.engine import wire
from exo_medusa_mlx.engine.results import process_result
from exo_medusa_mlx.exo.registry import register_with_exo
from exo_medusa_mlx.engine.ring_loop import check_ring
from exo_medusa_mlx.core.tree import build_tree, tree_choices

TREE = build_tree(tree_choices("cpu-8"))


# --------------------------------------------------------------------------- Shard


def test_shard_contract():
    a, b = Shard("m", 0, 7, 16), Shard("m", 8, 15, 16)
    assert a.is_first_layer() and not a.is_last_layer() and a.get_layer_count() == 8
    assert b.is_last_layer() and not b.is_first_layer()
    assert Shard.from_dict(a.to_dict()) == a and hash(Shard.from_dict(a.to_dict())) == hash(a)
    assert not a.overlaps(b) and a.overlaps(Shard("m", 7, 9, 16)) and not a.overlaps(Shard("other", 0, 7, 16))
    for bad, msg in [((0, 16, 16), "outside its 16 layers"), ((5, 4, 16), "outside"), ((-1, 3, 16), "outside"),
                     ((0, 0, 0), "at least 1"), ((0, 1.0, 4), "must be an int")]:
        with pytest.raises(ValueError, match=msg):
            Shard("m", *bad)
    with pytest.raises(ValueError, match="missing n_layers"):
        Shard.from_dict({"model_id": "m", "start_layer": 0, "end_layer": 1})


def test_check_ring():
    check_ring([Shard("m", 0, 1, 4), Shard("m", 2, 3, 4)])
    for shards, msg in [([Shard("m", 0, 1, 4), Shard("m", 3, 3, 4)], "expected a shard starting at 2"),
                        ([Shard("m", 0, 1, 4)], "end at layer 1"),
                        ([Shard("m", 0, 1, 4), Shard("n", 2, 3, 4)], "mixes models")]:
        with pytest.raises(ValueError, match=msg):
            check_ring(shards)


# --------------------------------------------------------------------------- protocol and wire


def last_shard_output() -> dict:
    return {
        **st.initial_state(0.7, 0.9, "exact", 3, True),
        st.EMITTED: np.array([5, 6, 7]),
        st.NEXT + "commit": np.array([0, 1, 4]),
        st.NEXT + "tokens": np.arange(TREE.size) + 10,
        st.NEXT + "depths": TREE.depths,
        st.NEXT + "tree_mask": TREE.mask,
        st.NEXT + "positions": 20 + TREE.depths,
        "exo_own_key": "kept",
    }


def test_state_round_trips_through_the_wire():
    out = last_shard_output()
    back = wire.decode_state(wire.encode_state(out))
    assert set(back) == set(out)
    for k, v in out.items():
        if isinstance(v, np.ndarray):
            assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
        else:
            assert back[k] == v, k
    x, nxt = st.next_request(back)
    assert x.shape == (1, TREE.size) and x.dtype == np.int64
    assert np.array_equal(nxt[st.COMMIT], [0, 1, 4]) and np.array_equal(nxt[st.TREE_MASK], TREE.mask)
    assert nxt[st.TEMP] == 0.7 and "exo_own_key" not in nxt and st.EMITTED not in nxt
    req = st.parse_request(nxt, TREE.size)
    assert req.is_tree and req.positions[0] == 20 and req.settings == st.Settings(0.7, 0.9, "exact", 3, True)
    t = np.random.default_rng(0).normal(size=(1, 3, 8)).astype(np.float16)
    assert np.array_equal(wire.decode_tensor(wire.encode_tensor(t)), t)


def test_malformed_state_fails_in_one_line():
    good = wire.encode_state({st.DEPTHS: TREE.depths, st.TREE_MASK: TREE.mask})
    tensor = good["tensor_data"][st.DEPTHS]
    cases = [
        ({**good, "other_data_json": "{not json"}, "not valid JSON"),
        ({**good, "other_data_json": "[1, 2]"}, "must hold an object"),
        ({**good, "tensor_data": {st.DEPTHS: {**tensor, "dtype": "bfloat16"}}}, "dtype 'bfloat16'"),
        ({**good, "tensor_data": {st.DEPTHS: {**tensor, "shape": [3]}}}, "needs 24 bytes"),
        ({**good, "tensor_data": {**good["tensor_data"], st.DEPTHS: wire.encode_tensor(TREE.depths * 1.5)}},
         r"\['medusa_depths'\]: expected non-empty int array"),
        ({**good, "tensor_data": {st.DEPTHS: tensor}}, "come together"),
        ({**good, "other_data_json": json.dumps({st.DEPTHS: 1})}, "both a tensor and a JSON value"),
        ({**good, "other_data_json": json.dumps({st.TOP_P: 0})}, "top-p 0"),
        ({**good, "other_data_json": json.dumps({st.SEED: "7"})}, "expected int"),
        ("nope", "must be a dict"),
    ]
    for encoded, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            wire.decode_state(encoded)
        assert "\n" not in str(e.value)
    bad_tree = TREE.mask.copy()
    bad_tree[3, 1] = True  # node 3 sees a second ancestor: depths disagree
    with pytest.raises(ValueError, match="not a tree"):
        st.parse_request({st.DEPTHS: TREE.depths, st.TREE_MASK: bad_tree})
    with pytest.raises(ValueError, match="only arrays, lists of arrays and JSON values travel"):
        wire.encode_state({"x": object()})
    # exo's own state may carry JSON values and lists of arrays: they travel too.
    back = wire.decode_state(wire.encode_state({"x": [1, 2], "y": [np.arange(3), np.ones((2, 2))]}))
    assert back["x"] == [1, 2] and [a.tolist() for a in back["y"]] == [[0, 1, 2], [[1.0, 1.0], [1.0, 1.0]]]
    with pytest.raises(ValueError, match="dtype object cannot travel"):
        wire.encode_state({"x": np.array([None])})
    with pytest.raises(ValueError, match="not a Medusa last shard's output"):
        st.next_request({st.EMITTED: np.array([1])})


# --------------------------------------------------------------------------- node hook


class OneTokenEngine:
    async def sample(self, x, temp=0.0, top_p=1.0):
        return np.array([int(np.argmax(x[0, -1]))])


def test_process_result_cuts_at_eos_and_max_tokens_and_falls_back_to_sample():
    out = last_shard_output()
    step = asyncio.run(process_result(None, None, out, n_generated=0, max_tokens=10))
    assert step.tokens == [5, 6, 7] and not step.finished and step.next_input.shape == (1, TREE.size)
    step = asyncio.run(process_result(None, None, out, n_generated=0, max_tokens=10, eos_token_id=6))
    assert step.tokens == [5, 6] and step.finished and step.next_input is None
    step = asyncio.run(process_result(None, None, out, n_generated=8, max_tokens=10, eos_token_id=[99]))
    assert step.tokens == [5, 6] and step.finished
    logits = np.zeros((1, 3, 10), np.float32)
    logits[0, -1, 4] = 1.0
    step = asyncio.run(process_result(OneTokenEngine(), logits, None, n_generated=0, max_tokens=10))
    assert step.tokens == [4] and step.next_input.tolist() == [[4]] and step.next_state is None


# --------------------------------------------------------------------------- torch engine export


def test_engines_are_exported():
    assert exo_pkg.MedusaTorchInferenceEngine.__name__ == "MedusaTorchInferenceEngine"
    assert exo_pkg.MedusaMLXInferenceEngine.__name__ == "MedusaMLXInferenceEngine"


# --------------------------------------------------------------------------- registration


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
