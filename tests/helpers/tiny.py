"""Tiny random MLX models from configs, float32, for fast exact tests; and mlx-lm's own greedy
decoding, the oracle for the MLX path."""

from __future__ import annotations

import importlib
import itertools

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map
from mlx_lm.generate import generate_step as mlx_generate_step
from mlx_lm.models.cache import KVCache, RotatingKVCache

from exo_medusa_mlx.cache import TreeOffset
from exo_medusa_mlx.core.heads_format import MedusaConfig
from exo_medusa_mlx.core.tree import build_tree
from exo_medusa_mlx.heads import MedusaHeads
from exo_medusa_mlx.model import MedusaModel
from helpers.oracle import PROMPT, OracleHeads

VOCAB = 96
N_LAYERS = 4  # the layers of a model an engine test splits (three ways at most)

_COMMON = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4,
               num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB, max_position_embeddings=512)

CONFIGS = {
    "llama": dict(_COMMON, model_type="llama", rope_theta=10000.0, tie_word_embeddings=False),
    "mistral": dict(_COMMON, model_type="mistral", rope_theta=100000.0, tie_word_embeddings=True),
    "qwen2": dict(_COMMON, model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3": dict(_COMMON, model_type="qwen3", rope_theta=1000000.0, tie_word_embeddings=False, head_dim=16),
}
_MODULE = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def tiny_base(family: str = "llama", seed: int = 0, layers: int | None = None):
    """An mlx-lm model of ``family`` (CONFIGS), its weights doubled: sharper, less tied logits.

    ``layers``: how many decoder layers (default the config's 2; ``N_LAYERS`` for a model to split).
    """
    mod = importlib.import_module(f"mlx_lm.models.{_MODULE[family]}")
    mx.random.seed(seed)
    config = CONFIGS[family] if layers is None else {**CONFIGS[family], "num_hidden_layers": layers}
    model = mod.Model(mod.ModelArgs.from_dict(config))
    model.update(tree_map(lambda w: w * 2.0, model.parameters()))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def random_heads(num_heads: int = 3, seed: int = 1, own_lm_head: bool = False, num_layers: int = 1,
                 next_token: bool = False, hydra: bool = False) -> MedusaHeads:
    cfg = MedusaConfig(num_heads=num_heads, hidden_size=_COMMON["hidden_size"], vocab_size=VOCAB,
                       num_layers=num_layers, own_lm_head=own_lm_head, next_token=next_token, hydra=hydra)
    heads = MedusaHeads(cfg)
    mx.random.seed(seed)
    heads.update(tree_map(lambda w: mx.random.normal(w.shape) * 0.3, heads.parameters()))
    mx.eval(heads.parameters())
    return heads


def tiny_medusa(family="llama", tree=None, heads=None, seed=0) -> MedusaModel:
    heads = heads if heads is not None else random_heads()
    return MedusaModel(tiny_base(family, seed), heads, build_tree(tree if tree is not None else [[0], [1], [0, 0]]))


def mlx_lm_caches(base, max_kv_size: int | None = None) -> list:
    """mlx-lm's own per-layer caches; built by hand: llama's make_cache in mlx-lm 0.32 ignores max_kv_size."""
    return [RotatingKVCache(max_size=max_kv_size, keep=4) if max_kv_size else KVCache() for _ in base.layers]


def mlx_lm_greedy(base, n: int, prompt=PROMPT, max_kv_size: int | None = None) -> list[int]:
    """mlx-lm's own greedy decoding: the first n tokens after ``prompt``."""
    gen = mlx_generate_step(mx.array(prompt), base, prompt_cache=mlx_lm_caches(base, max_kv_size))
    return [t for t, _ in itertools.islice(gen, n)]


class OracleMedusa(OracleHeads, MedusaModel):
    """Heads that know the plain greedy continuation ``future`` (absolute positions).

    Head i's guesses for position p put the true token at a rank drawn from
    ``ranks`` (0 = top-1), so branching trees see non-first children accepted and
    commits gather nodes that are not contiguous.
    """

    def project(self, h, depth=None):
        """(1+D, V) at the last committed position, or (1+D, T, V) at each node in flight."""
        return mx.array(self.rigged(np.array(super().project(h, depth)), h.ndim == 1))

    def node_positions(self, caches, T):
        offset = caches[0].offset  # an int, a device scalar (lookahead) or per-token TreeOffset
        if isinstance(offset, TreeOffset):
            return np.array(offset.positions)
        return int(np.array(offset)) + np.arange(T)
