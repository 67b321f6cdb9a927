"""The shard engines' protocol (``engine/protocol.py``, ``wire.py``, ``shard.py``, ``results.py``,
``ring_loop.py``): the Shard contract, a ring's shards checked, the inference_state round trip through
the wire format and its one-line refusals, a last shard's result cut at EOS and max tokens. Exo
registration: ``test_exo_registry.py``."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from exo_medusa_mlx.exo import Shard
from exo_medusa_mlx.engine import protocol as st
from exo_medusa_mlx.engine import wire
from exo_medusa_mlx.engine.results import process_result
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
