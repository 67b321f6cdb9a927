"""MLX models for the batch tests: oracle heads over a tiny base (each sequence's heads know its own
greedy continuation), mlx-lm's greedy references, the named trees."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from exo_medusa_mlx.cache import TreeOffset
from exo_medusa_mlx.core.tree import build_tree, tree_choices
from exo_medusa_mlx.model import MedusaModel
from helpers.batch_oracle import BatchOracleHeads
from helpers.tiny import mlx_lm_greedy, random_heads

TREES = {name: build_tree(tree_choices(name)) for name in ("cpu-8", "chain-3", "mc_sim_7b_63")}


class Oracle(BatchOracleHeads, MedusaModel):
    def context(self, caches):
        return caches[0].ctx

    def positions(self, caches, B, T):
        off = caches[0].offset  # an int, per-row offsets (B,) or per-token positions
        if isinstance(off, TreeOffset):
            return np.array(off.positions).reshape(B, T)
        return np.broadcast_to(np.array(off).reshape(-1, 1) + np.arange(T), (B, T))

    def host(self, a):
        return np.array(a)

    def project(self, h, depth=None):
        return mx.array(self.rigged(np.array(super().project(h, depth)), np.array(h)))


def references(base, prompts, n, max_kv_size=None):
    """mlx-lm's greedy ``n`` tokens after each prompt."""
    return [mlx_lm_greedy(base, n, p, max_kv_size) for p in prompts]


def oracle(base, prompts, refs, tree="cpu-8", ranks=(0, 1, 2)):
    """A Medusa model whose heads know each prompt's continuation ``refs`` (told apart by the first token)."""
    futures = {int(p[0]): np.concatenate([p, r]) for p, r in zip(prompts, refs)}
    return Oracle(base, random_heads(4), TREES[tree], futures, ranks=ranks)
