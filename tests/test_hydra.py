"""Hydra heads (sequentially dependent): head d reads the tokens of the path it extends, so a node's
children depend on the node. The tree each node proposes equals a node-by-node computation, decoding
stays lossless on both backends (lookahead included), the exo ring handles them, and checkpoints say
their layout."""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

from exo_medusa_mlx.core.base import ancestors
from exo_medusa_mlx.core.heads_format import MedusaConfig, read_heads, write_heads
from exo_medusa_mlx.core.step import ROOT_ONLY, generate_step
from exo_medusa_mlx.core.tree import build_tree, tree_choices
from exo_medusa_mlx.heads import load_heads
from exo_medusa_mlx.model import MedusaModel
from helpers.oracle import PROMPT, take
from helpers.tiny import VOCAB, mlx_lm_greedy, random_heads, tiny_base

H = 64
TREES = ["chain-3", "cpu-8", "mc_sim_7b_63"]


def node_by_node(model: MedusaModel, h: mx.array, tree) -> np.ndarray:
    """The next tree at one hidden state, computed the slow way: every node's token from its
    parent's path, one head call per node."""
    heads, embed = model.heads, model.base.model.embed_tokens
    tokens = [int(mx.argmax(model.logits(h)))]
    for c in range(1, tree.size):
        path = ancestors(tree, np.array([tree.parents[c]]))[0]  # root .. parent
        d = len(path) - 1
        state = heads.heads[d](h, [embed(mx.array(tokens[p])) for p in path])
        scores = np.array(model.logits(state))
        tokens.append(int(np.argsort(-scores, kind="stable")[tree.choices[c - 1][-1]]))
    return np.array(tokens)


@pytest.mark.parametrize("tree", TREES)
def test_each_node_proposes_the_tree_its_path_gives(tree):
    model = MedusaModel(tiny_base("llama"), random_heads(4, hydra=True), build_tree(tree_choices(tree)))
    h = mx.random.normal((5, H), key=mx.random.key(3))
    _, drafts = model.propose_tree(h, model.tree)
    drafts = np.array(drafts)
    assert drafts.shape == (5, model.tree.size)
    for r in range(5):
        np.testing.assert_array_equal(drafts[r], node_by_node(model, h[r], model.tree))
    # Sequentially dependent: siblings' children differ (the independent layout would repeat them).
    t = model.tree
    if t.depth >= 2 and len(t.children[1]) and len(t.children[2]):
        assert any(drafts[r, t.children[1][0]] != drafts[r, t.children[2][0]] for r in range(5))


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def family(request):
    base = tiny_base(request.param)
    return base, mlx_lm_greedy(base, 40)


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("lookahead", [False, True])
def test_hydra_decoding_is_lossless(family, tree, lookahead):
    base, ref = family
    model = MedusaModel(base, random_heads(4, hydra=True), build_tree(tree_choices(tree)))
    assert take(generate_step(PROMPT, model, fast_path=lookahead), 40)[0] == ref
    assert take(generate_step(PROMPT, model, tree=ROOT_ONLY), 40)[0] == ref


def test_hydra_with_a_draft_vocabulary_and_a_window(family):
    base, _ = family
    heads = random_heads(3, hydra=True)
    heads.draft_vocab = np.arange(0, VOCAB, 2)
    model = MedusaModel(base, heads, build_tree(tree_choices("cpu-8")))
    assert take(generate_step(PROMPT, model, max_kv_size=16), 64)[0] == mlx_lm_greedy(base, 64, max_kv_size=16)


def test_hydra_checkpoints_say_their_layout(tmp_path):
    heads = random_heads(3, hydra=True)
    folder = heads.save(tmp_path / "h")
    weights, raw, _ = read_heads(folder)
    assert raw["layout"] == "hydra" and "2.path.2.weight" in weights and "0.path.1.weight" not in weights
    again = load_heads(folder, H, VOCAB)
    assert again.config.layout == "hydra"
    h = mx.random.normal((2, H))
    embeds = [mx.random.normal((2, H)) for _ in range(3)]
    for a, b in zip(heads.states(h, path_embeds=embeds), again.states(h, path_embeds=embeds)):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-6)
    for drop, msg in (("2.path.1.bias", "missing tensor '2.path.1.bias'"), (None, "both next-token and hydra")):
        bad = dict(weights)
        if drop:
            bad.pop(drop)
        else:
            bad |= {f"{i}.next_token.{p}": np.zeros((H, H) if p == "weight" else H, np.float32)
                    for i in range(3) for p in ("weight", "bias")}
        write_heads(tmp_path / "bad", bad, MedusaConfig(num_heads=3, hidden_size=H, vocab_size=VOCAB))
        with pytest.raises(ValueError, match=msg):
            load_heads(tmp_path / "bad", H, VOCAB)


def test_hydra_on_torch_equals_mlx(tmp_path):
    torch = pytest.importorskip("torch")
    from exo_medusa_mlx.torch_compat.heads import load_heads as torch_heads
    from exo_medusa_mlx.torch_compat.model import MedusaModel as TorchMedusa
    from helpers.folders import save_hf_folder
    from helpers.torch_models import torch_base

    base = tiny_base("llama")
    folder = random_heads(3, hydra=True).save(tmp_path / "heads")
    tree = build_tree(tree_choices("cpu-8"))
    mm = MedusaModel(base, load_heads(folder, H, VOCAB), tree)
    tb = torch_base(save_hf_folder(tmp_path / "base", "llama", base, transformers=True))
    tm = TorchMedusa(tb, torch_heads(folder, H, VOCAB), tree)
    h = np.random.default_rng(0).normal(size=(4, H)).astype(np.float32)
    np.testing.assert_array_equal(np.array(mm.propose_tree(mx.array(h), tree)[1]).astype(np.int64),
                                  tm.propose_tree(torch.from_numpy(h), tree)[1].numpy())
    want = take(generate_step(PROMPT, mm), 32)[0]
    assert take(generate_step(PROMPT, tm), 32)[0] == want
    assert take(generate_step(PROMPT, tm, fast_path=True), 32)[0] == want  # the static step (CUDA graphs' body)


def test_hydra_across_an_exo_ring(tmp_path):
    from exo_medusa_mlx.exo import LocalShardDownloader, MedusaMLXInferenceEngine, Shard, run_ring
    from helpers.engines import SPLITS
    from helpers.folders import save_hf_folder
    from helpers.oracle import N, reference
    from helpers.tiny import N_LAYERS

    base, heads = tiny_base("llama", layers=N_LAYERS), random_heads(3, hydra=True)
    folder = save_hf_folder(tmp_path / "m", "llama", base, heads)
    dl = LocalShardDownloader({"m": folder}, trees={"m": "cpu-8"})
    ref = reference(MedusaModel(base, heads, build_tree(tree_choices("cpu-8"))))
    pairs = [(MedusaMLXInferenceEngine(dl), Shard("m", a, b, N_LAYERS)) for a, b in SPLITS[2]]
    assert run_ring(pairs, PROMPT, N) == ref
