"""``MedusaMLXInferenceEngine``: one shard of an mlx-lm model, Medusa across the ring.

Composes mlx-lm's own modules: the first shard calls ``model.embed_tokens``, every
shard runs its ``layers[start:end+1]`` as ``layer(h, mask, cache=c)`` over our
``MedusaKVCache``s (one ``CacheContext`` per request), the last applies
``model.norm``, the lm_head and the Medusa heads. Weights load lazily and only
the shard's are evaluated, so a shard holds its own layers in memory, not the model's.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from ..cache import make_cache
from ..core.attach import attach
from ..loading import resolve_dtype
from ..model import MedusaModel
from .loaded import LoadedShard
from .sessions import Session
from .shard_engine import MedusaShardEngine
from .shard import Shard

EVAL_EACH_LAYER_TOKENS = 256  # passes this long are evaluated per layer (a few ms each at least)


def load_shard_model(shard: Shard, path: Path, heads=None, tree=None, dtype=None):
    """(MedusaModel, tokenizer) with only ``shard``'s weights evaluated."""
    from mlx_lm.utils import load_model, load_tokenizer

    base, config = load_model(Path(path), lazy=True)
    n = len(base.model.layers)
    if n != shard.n_layers:
        raise ValueError(f"shard of '{shard.model_id}' says {shard.n_layers} layers but {path} has {n}; "
                         f"use n_layers={n}")
    tokenizer = load_tokenizer(Path(path), eos_token_ids=config.get("eos_token_id"))
    dtype = resolve_dtype(dtype)
    if dtype is not None:
        base.set_dtype(dtype)
    model = attach(base, heads, tree, MedusaModel, model_id=shard.model_id, probe=False)  # a shard cannot probe
    inner = base.model
    params = [inner.layers[i].parameters() for i in range(shard.start_layer, shard.end_layer + 1)]
    if shard.is_first_layer():
        params.append(inner.embed_tokens.parameters())
    if shard.is_last_layer():
        params.append(inner.norm.parameters())
        head = getattr(model.lm_head, "__self__", model.lm_head)  # tied: the embedding's as_linear
        params.append(head.parameters())
        if model.heads is not None and model.heads.config.next_token:
            params.append(inner.embed_tokens.parameters())  # the heads read the next token's embedding
    mx.eval(params)
    return model, tokenizer


class MLXShard(LoadedShard):
    """A shard's mlx-lm layers over ``MedusaKVCache``s (one ``CacheContext`` per request)."""

    def __init__(self, shard: Shard, tokenizer, model: MedusaModel):
        super().__init__(shard, tokenizer, model)
        self.dtype = model.base.model.norm.weight.dtype  # what hidden states are computed in

    def new_cache(self, max_kv_size: int | None, keep: int):
        return make_cache(self.shard.get_layer_count(), max_kv_size, keep)

    def device_array(self, x: np.ndarray) -> mx.array:
        if x.dtype.kind in "iu":
            return mx.array(x.astype(np.int32))
        return mx.array(x).astype(self.dtype)  # bfloat16 travels as float32 (numpy has none)

    def layers(self, h: mx.array, sess: Session, transposed: bool, check) -> mx.array:
        layers = self.model.base.model.layers[self.shard.start_layer : self.shard.end_layer + 1]
        mask = sess.caches[0].make_mask(h.shape[1])
        with self.model.placed(sess.caches, transposed):
            for layer, c in zip(layers, sess.caches):
                h = layer(h, mask, cache=c)
                self.layer_done(h, check)
        return h

    def layer_done(self, h: mx.array, check) -> None:
        # MLX builds the graph lazily: a long pass is evaluated layer by layer, so that a
        # cancelled one stops after the layer it is in, not after the whole chunk.
        if check is not None and h.shape[1] >= EVAL_EACH_LAYER_TOKENS:
            mx.eval(h)
        super().layer_done(h, check)


class MedusaMLXInferenceEngine(MedusaShardEngine):
    """exo's engine contract on MLX, with Medusa speculative decoding across shards.

    Constructed like exo's engines, ``MedusaMLXInferenceEngine(shard_downloader)``;
    keyword options are in ``MedusaShardEngine``.
    """

    _worker_exit = staticmethod(mx.clear_streams)  # MLX asks each thread to free its streams before it ends

    def _load_backend(self, shard: Shard, path: Path, heads, tree) -> MLXShard:
        model, tokenizer = load_shard_model(shard, path, heads, tree, self.dtype)
        return MLXShard(shard, tokenizer, model)

    async def load_checkpoint(self, shard: Shard, path: str | Path) -> None:
        """Load weights (safetensors, mlx-lm names) over the shard's model; missing names are kept."""
        await self.ensure_shard(shard)
        await self._run(self.model.base.load_weights, str(path), False)

    async def save_checkpoint(self, shard: Shard, path: str | Path) -> None:
        """Write this shard's weights (its layers, and the embedding / norm / lm_head it holds)."""
        await self.ensure_shard(shard)

        def save():
            from mlx.utils import tree_flatten

            s = self.shard
            keep = tuple(f"model.layers.{i}." for i in range(s.start_layer, s.end_layer + 1))
            if s.is_first_layer():
                keep += ("model.embed_tokens.",)
            if s.is_last_layer():
                keep += ("model.norm.", "lm_head.")
            weights = {k: v for k, v in tree_flatten(self.model.base.parameters()) if k.startswith(keep)}
            mx.save_safetensors(str(path), weights)

        await self._run(save)
