import json

import numpy as np
import pytest

from exo_medusa_mlx.core.tree import build_tree, load_tree, preset_names, save_tree, tree_choices


def test_small_tree_buffers_by_hand():
    t = build_tree([[1], [0], [0, 0]])  # sorted: [0], [1], [0, 0]
    assert t.choices == ((0,), (1,), (0, 0))
    assert t.parents.tolist() == [-1, 0, 0, 1]
    assert t.depths.tolist() == [0, 1, 1, 2]
    assert t.tree_indices.tolist() == [0, 1, 2, 1 + 2 * 1 + 0]  # topk = 2
    assert t.mask.astype(int).tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]
    assert sorted(map(tuple, t.retrieve_indices.tolist())) == [(0, 1, 3), (0, 2, -1)]
    assert t.children[0] == (1, 2) and t.children[1] == (3,)


def test_mc_sim_7b_63_shape():
    t = load_tree("mc_sim_7b_63")
    assert t.size == 64 and t.depth == 4 and t.topk == 10
    assert t.retrieve_indices.shape == (42, 5)
    # Every node's mask row is exactly its ancestor chain.
    for k in range(t.size):
        chain, j = set(), k
        while j >= 0:
            chain.add(j)
            j = t.parents[j]
        assert set(np.flatnonzero(t.mask[k])) == chain


@pytest.mark.parametrize("name,size", [("cpu-4", 4), ("cpu-6", 6), ("cpu-8", 8), ("cpu-12", 12), ("cpu-16", 16)])
def test_cpu_presets(name, size):
    assert load_tree(name).size == size
    assert name in preset_names()


def test_chain_and_root_only():
    t = load_tree("chain-3")
    assert t.is_chain and t.size == 4 and t.topk == 1
    assert build_tree([]).size == 1


@pytest.mark.parametrize("choices,msg", [
    ([[0], []], "empty"),
    ([[0], [1, 0]], "no parent"),
    ([[0], [0]], "twice"),
    ([[0], [-1]], "non-negative"),
    ("nope", "unknown tree"),
    ([[0], [0, 0], [0, 0, 0]], "heads"),
    ([[0], [3]], "top-k"),
])
def test_malformed_trees(choices, msg):
    with pytest.raises(ValueError, match=msg):
        if isinstance(choices, str):
            load_tree(choices)
        elif msg == "heads":
            build_tree(choices, num_heads=2)
        elif msg == "top-k":
            build_tree(choices, topk=2)
        else:
            build_tree(choices)


def test_json_round_trip(tmp_path):
    p = tmp_path / "t.json"
    save_tree(p, [[0], [1], [0, 0]], predicted_speedup=1.4)
    data = json.loads(p.read_text())
    assert data["predicted_speedup"] == 1.4 and data["nodes"] == 4
    assert load_tree(str(p)).choices == build_tree([[0], [1], [0, 0]]).choices
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        tree_choices(str(bad))
    with pytest.raises(FileNotFoundError):
        tree_choices(str(tmp_path / "missing.json"))


def test_trees_the_heads_cannot_fill_and_folders_are_refused(tmp_path):
    from exo_medusa_mlx.model import MedusaModel
    from helpers.tiny import random_heads, tiny_base

    heads = random_heads(1)
    heads.draft_vocab, heads.config.draft_vocab_size = np.array([1, 2, 3]), 3  # the heads choose among 3 tokens
    model = MedusaModel(tiny_base(), heads, load_tree([[0], [2]]))
    assert model.tree.topk == 3
    with pytest.raises(ValueError, match="rank-3 guess but they choose among 3 tokens"):
        model.with_tree([[0], [3]])
    with pytest.raises(ValueError, match="2 deep but the heads give 1 guesses"):
        model.with_tree([[0], [0, 0]])
    with pytest.raises(ValueError, match="needs Medusa heads"):
        MedusaModel(tiny_base(), None, load_tree([[0]]))
    with pytest.raises(ValueError, match="is a folder"):
        tree_choices(str(tmp_path))
    save_tree(tmp_path / "t.json", [[0], [1]])
    assert not list(tmp_path.glob("*.tmp")) and tree_choices(str(tmp_path / "t.json")) == [[0], [1]]
