"""exo's KV prefix cache for the Medusa engines: a prompt's keys and values, kept in exo's own format.

exo keeps each served prompt's per-layer mlx-lm ``KVCache``s in its ``KVPrefixCache``; a
new prompt that starts as a kept one does takes a copy trimmed to the shared start and
prefills only the rest. After its prefill, the Medusa cache holds the same keys and
values (each prompt token at its position, in slot order; tree tokens come later and
are never kept), so ``PrefixCache`` hands them to exo's ``KVPrefixCache`` as
``KVCache``s, and loads a hit into a fresh Medusa cache. exo's cache decides what
matches, what is kept and what is evicted, on every rank alike.

The reuse is as exact as exo's own: the kept keys and values are those a prefill
computes for those positions; prefilling the rest as a separate chunk may round
differently from one prefill of the whole prompt, in exo's engine as here.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from exo.worker.engines.mlx.cache import KVPrefixCache
from exo.worker.engines.mlx.generator.batch_generate import _MIN_PREFIX_HIT_RATIO_TO_UPDATE
from exo.worker.engines.mlx.utils_mlx import system_prompt_token_count

from ..model import MedusaModel

MIN_UPDATE_HIT = 1000  # exo's: a hit this long (or a whole system prompt) updates its entry in place


class PrefixCache:
    """exo's ``KVPrefixCache`` (one per runner, on every rank; None: exo keeps none) serving Medusa caches."""

    def __init__(self, kept: KVPrefixCache | None, model, medusa: MedusaModel, tokenizer):
        self.kept, self.model, self.medusa, self.tokenizer = kept, model, medusa, tokenizer

    def uses(self, task) -> bool:
        """Whether ``task`` goes through exo's cache: not exo's bench requests, unless they ask."""
        return self.kept is not None and (not task.bench or task.use_prefix_cache)

    def load(self, ids: np.ndarray, task) -> tuple:
        """A fresh Medusa cache holding the longest kept start of ``ids``, less at least its last token.
        Returns (ctx, caches, tokens loaded, exo's matched entry or None)."""
        ctx, caches = self.medusa.make_cache()
        if not self.uses(task):
            return ctx, caches, 0, None
        kept, rest, index, _ = self.kept.get_kv_cache(self.model, mx.array(ids.tolist()))
        hit = min(len(ids) - len(rest), len(ids) - 1)  # the last token's hidden state starts the decoding
        if index is None or hit == 0:
            return ctx, caches, 0, None
        ctx.begin(n=hit)  # the kept tokens, written as a prefill chunk writes them
        for c, kv in zip(caches, kept, strict=True):  # exo trimmed each to ``hit`` (its offset)
            c.update_and_fetch(kv.keys[..., :hit, :], kv.values[..., :hit, :])
        ctx.commit(caches, np.arange(hit))
        self.medusa.settle(caches)
        return ctx, caches, hit, index

    def keep(self, ids: np.ndarray, ctx, caches, hit: int, index: int | None, task, prefill_tps: float) -> None:
        """After the prefill, give exo's cache the prompt's keys and values: a new entry, or the matched
        one updated, as exo decides for its own engine."""
        if not self.uses(task):
            return
        n = len(ids)
        assert ctx.window is None and np.array_equal(ctx.slot_pos, np.arange(n)), "slots are not positions"
        entries = []
        for c in caches:
            kv = KVCache()
            kv.update_and_fetch(c.keys[..., :n, :], c.values[..., :n, :])
            entries.append(kv)
        mx.eval([(kv.keys, kv.values) for kv in entries])
        prompt = mx.array(ids.tolist())
        long_hit = hit >= max(MIN_UPDATE_HIT, system_prompt_token_count(task, self.tokenizer))
        if index is not None and long_hit and hit / n >= _MIN_PREFIX_HIT_RATIO_TO_UPDATE:
            self.kept.update_kv_cache(index, prompt, entries, None, restore_pos=hit, prefill_tps=prefill_tps)
        else:
            self.kept.add_kv_cache(prompt, entries, None, prefill_tps=prefill_tps)
