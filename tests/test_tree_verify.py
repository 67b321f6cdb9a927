"""One tree forward == sequential decoding of every root-to-node path."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache, RotatingKVCache

from exo_medusa_mlx.core.step import prefill
from exo_medusa_mlx.model import MedusaModel
from exo_medusa_mlx.core.tree import build_tree, tree_choices
from tiny import CONFIGS, VOCAB, tiny_base

PROMPT = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])


def sequential_logits(base, tokens, max_kv_size=None):
    """Logits after feeding ``tokens`` one by one to mlx-lm's own cache."""
    cache = [RotatingKVCache(max_size=max_kv_size, keep=4) if max_kv_size else KVCache() for _ in base.layers]
    out = None
    for t in tokens:
        out = base(mx.array([[int(t)]]), cache=cache)
    return out[0, -1]


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("tree,window", [("cpu-16", None), ("mc_sim_7b_63", None), ("cpu-16", 14)])
def test_tree_logits_match_sequential(family, tree, window):
    base = tiny_base(family)
    model = MedusaModel(base, None, build_tree([]))
    buf = build_tree(tree_choices(tree))
    rng = np.random.default_rng(0)
    tree_tokens = rng.integers(0, VOCAB, size=buf.size)
    ctx, caches = model.make_cache(window)
    prefill(model, ctx, caches, PROMPT)
    h = model.forward(ctx, caches, tree_tokens, buf)
    logits = model.logits(h)
    for node in range(buf.size):
        path = []
        j = node
        while j >= 0:
            path.append(tree_tokens[j])
            j = buf.parents[j]
        want = sequential_logits(base, list(PROMPT) + path[::-1], window)
        diff = float(mx.abs(logits[node] - want).max())
        assert diff < 1e-4, (node, diff)


@pytest.mark.parametrize("chunk", [7, 2048])
def test_prompt_longer_than_window(chunk):
    """Prefill of a prompt longer than the window (in chunks or at once) then a tree:
    each query sees exactly what token-by-token decoding through mlx-lm's
    RotatingKVCache would."""
    base = tiny_base("qwen2")
    model = MedusaModel(base, None, build_tree([]))
    buf = build_tree(tree_choices("cpu-8"))
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, VOCAB, size=40)
    tree_tokens = rng.integers(0, VOCAB, size=buf.size)
    ctx, caches = model.make_cache(16)
    prefill(model, ctx, caches, prompt, step=chunk)
    assert ctx.used == 15
    logits = model.logits(model.forward(ctx, caches, tree_tokens, buf))
    for node in range(buf.size):
        path, j = [], node
        while j >= 0:
            path.append(tree_tokens[j])
            j = buf.parents[j]
        want = sequential_logits(base, list(prompt) + path[::-1], 16)
        assert float(mx.abs(logits[node] - want).max()) < 1e-4
