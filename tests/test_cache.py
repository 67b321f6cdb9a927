"""The MLX KV cache (``cache.py``): one tree forward through it == sequential decoding of every
root-to-node path through mlx-lm's own caches; a commit gathers the accepted nodes' keys and values
into their slots in every layer; a window keeps the sink tokens and the latest positions, and
decoding through it equals mlx-lm's ``RotatingKVCache`` with bounded memory."""

import mlx.core as mx
import numpy as np
import pytest

from exo_medusa_mlx.cache import TreeOffset, make_cache
from exo_medusa_mlx.core.step import prefill
from exo_medusa_mlx.core.tree import build_tree, tree_choices
from exo_medusa_mlx.model import MedusaModel
from helpers.oracle import PROMPT as DECODE_PROMPT
from helpers.oracle import decode, root_path
from helpers.tiny import CONFIGS, VOCAB, OracleMedusa, mlx_lm_caches, mlx_lm_greedy, random_heads, tiny_base

PROMPT = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])


def sequential_logits(base, tokens, max_kv_size=None):
    """Logits after feeding ``tokens`` one by one to mlx-lm's own cache."""
    cache = mlx_lm_caches(base, max_kv_size)
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
        path = [tree_tokens[n] for n in root_path(buf, node)]
        want = sequential_logits(base, list(PROMPT) + path, window)
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
        path = [tree_tokens[n] for n in root_path(buf, node)]
        want = sequential_logits(base, list(prompt) + path, 16)
        assert float(mx.abs(logits[node] - want).max()) < 1e-4


# --------------------------------------------------------------------------- the cache, directly

H, D = 2, 4  # key/value heads and head size of the cache tests


def kv(rng, T):
    """Keys and values (1, H, T, D) for T new tokens."""
    return tuple(mx.array(rng.normal(size=(1, H, T, D)).astype(np.float32)) for _ in range(2))


def test_a_commit_gathers_the_accepted_nodes_into_every_layer():
    rng = np.random.default_rng(0)
    ctx, caches = make_cache(3)
    k0, v0 = kv(rng, 5)
    ctx.begin(n=5)
    for c in caches:
        c.update_and_fetch(k0, v0)
    ctx.commit(caches, np.arange(5))
    tree = build_tree(tree_choices("cpu-8"))
    kt, vt = kv(rng, tree.size)
    ctx.begin(tree.depths, tree.mask)
    assert isinstance(ctx.rope_offset, TreeOffset)
    assert np.array(ctx.rope_offset.positions).tolist() == (5 + tree.depths).tolist()
    # Each node sees the committed tokens and its own ancestors, nothing else.
    want_mask = np.concatenate([np.ones((tree.size, 5), bool), tree.mask], axis=1)
    assert np.array_equal(np.array(caches[0].make_mask(tree.size)), want_mask)
    for c in caches:
        keys, values = c.update_and_fetch(kt, vt)
        assert np.array_equal(np.array(keys), np.concatenate([np.array(k0), np.array(kt)], axis=2))
    path = [0, 1, 5]  # root, [0], [0, 1]: not contiguous in the forward
    ctx.commit(caches, np.array(path))
    assert ctx.committed == 8 and ctx.slot_pos.tolist() == list(range(8))
    for c in caches:
        keys, values = (np.array(a)[..., : ctx.used, :] for a in c.state)
        np.testing.assert_array_equal(keys, np.concatenate([np.array(k0), np.array(kt)[:, :, path]], axis=2))
        np.testing.assert_array_equal(values, np.concatenate([np.array(v0), np.array(vt)[:, :, path]], axis=2))


@pytest.mark.parametrize("chunk", [1, 3])
def test_a_window_keeps_the_sinks_and_the_latest_positions(chunk):
    """mlx-lm's rule: a query sees the ``keep`` sink tokens and the last ``W - keep`` positions; the cache
    holds the W - 1 committed ones of them (the query itself sits in the forward's scratch region)."""
    W, keep, n = 9, 4, 23
    rng = np.random.default_rng(1)
    ctx, caches = make_cache(2, W, keep)
    written = {}  # position -> (key, value) rows written for it
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        k, v = kv(rng, e - s)
        ctx.begin(n=e - s)
        for c in caches:
            c.update_and_fetch(k, v)
        ctx.commit(caches, np.arange(e - s))
        written.update({p: (np.array(k)[:, :, p - s], np.array(v)[:, :, p - s]) for p in range(s, e)})
    assert ctx.used == W - 1
    assert sorted(ctx.slot_pos.tolist()) == list(range(keep)) + list(range(n - (W - 1 - keep), n))
    for c in caches:
        keys, values = (np.array(a) for a in c.state)
        for slot, pos in enumerate(ctx.slot_pos.tolist()):
            np.testing.assert_array_equal(keys[:, :, slot], written[pos][0], err_msg=f"slot {slot}")
            np.testing.assert_array_equal(values[:, :, slot], written[pos][1], err_msg=f"slot {slot}")


# --------------------------------------------------------------------------- decoding through a window


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("medusa", [False, True])
def test_window_equals_mlx_lm_rotating(family, medusa):
    base = tiny_base(family)
    W, n = 16, 64  # prompt 9 + 64 tokens through a 16-token window: several wrap-arounds
    ref = mlx_lm_greedy(base, n, max_kv_size=W)
    if medusa:
        model = OracleMedusa(base, random_heads(4), build_tree(tree_choices("cpu-8")),
                             np.concatenate([DECODE_PROMPT, ref]), ranks=(0, 1, 2))
    else:
        model = MedusaModel(base, random_heads(), build_tree([[0]]))
    tokens, _ = decode(model, n, max_kv_size=W, medusa=medusa)
    assert tokens == ref


def test_window_memory_is_bounded():
    base = tiny_base("llama")
    W, n = 16, 120
    ref = mlx_lm_greedy(base, n, max_kv_size=W)
    model = OracleMedusa(base, random_heads(4), build_tree(tree_choices("cpu-8")),
                         np.concatenate([DECODE_PROMPT, ref]), ranks=(0, 1))
    tokens, steps = decode(model, n, max_kv_size=W)
    assert tokens == ref and steps < n / 2  # accepting deep, through many wrap-arounds
    # The committed tokens far outnumber the window; the cache holds W - 1 of them.
    assert model.ctx.used == W - 1 and model.ctx.committed > n
