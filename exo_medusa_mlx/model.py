"""Medusa on mlx-lm's own model classes: heads beside the model, no copied model files.

The tree reaches attention through our cache: the mask through ``make_mask``, the
per-token RoPE positions through ``offset``. During a call the model's RoPE and
linears may be wrapped (``TreeRoPE``, ``RowsLinear``); between calls mlx-lm's
model is exactly as it was loaded, so mlx-lm can run it too.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .array_ops import MLXOps
from .heads import MedusaHeads, load_heads
from .cache import DEFAULT_KEEP, BatchContext, CacheContext, TreeOffset, make_batch_cache, make_cache
from .core.base import MedusaBase, swapped_class

# Families whose attention reads ``cache.offset`` for RoPE and ``cache.make_mask``
# for the mask, and whose model returns normed hidden states: checked by tests.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class TreeRoPE(nn.Module):
    """A layer's RoPE for tree tokens at per-token positions (``TreeOffset``).

    ``mx.fast.rope`` takes one offset per batch row, so the tokens are moved to the
    batch axis, rotated each at its own position, and moved back. Positions (T,) are
    the same for every row; (B, T) are a batch's, one row per sequence.
    """

    def __init__(self, rope):
        super().__init__()
        self.inner = rope

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        if not isinstance(offset, TreeOffset):
            return self.inner(x, offset=offset)
        B, H, T, D = x.shape
        y = x.transpose(0, 2, 1, 3).reshape(B * T, H, 1, D)  # (B*T, H, 1, D)
        pos = offset.positions
        pos = pos.reshape(-1) if pos.ndim == 2 else mx.tile(pos, (B,))
        y = self.inner(y, offset=pos)
        return y.reshape(B, T, H, D).transpose(0, 2, 1, 3)


class RowsLinear(nn.Linear):
    """An ``nn.Linear`` that computes ``(W @ x.T).T`` instead of ``x @ W.T``.

    On a CPU, OpenBLAS takes 1.4-1.6x as long to multiply a few rows by a
    transposed weight matrix as to multiply the weight matrix by a few columns
    (SmolLM2's MLP projections, 2 to 16 rows; 1.1x at 64). ``MedusaModel`` runs the
    decoder layers' linears as this class for the call of a verification forward
    on a CPU only; prefill and single-token steps keep mlx-lm's own product, so
    plain decoding stays bit-identical to mlx-lm's.
    """

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.reshape(-1, x.shape[-1])
        y = (self.weight @ rows.T).T
        if "bias" in self:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def check_supported(base) -> None:
    """Raise at load time for an architecture the tree cache can't drive exactly."""
    mtype = getattr(getattr(base, "args", None), "model_type", getattr(base, "model_type", "?"))
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type '{mtype}' is not supported by Medusa yet (supported: {', '.join(SUPPORTED_MODEL_TYPES)}); "
            "run it with --no-medusa or use mlx_lm.generate"
        )
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    if not layers or not all(hasattr(getattr(l, "self_attn", None), "rope") for l in layers):
        raise ValueError(f"model type '{mtype}': layers have no self_attn.rope; Medusa cannot place tree tokens")
    layer_types = getattr(base.args, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"model type '{mtype}' with sliding-window layers is not supported by Medusa")


def base_lm_head(base):
    """The base model's vocabulary projection (tied embeddings or lm_head)."""
    if getattr(base.args, "tie_word_embeddings", False) or not hasattr(base, "lm_head"):
        return base.model.embed_tokens.as_linear
    return base.lm_head


def lm_head_rows(base, ids: np.ndarray) -> tuple[mx.array, mx.array]:
    """(ids, the lm_head's rows for them as a dense matrix), for a draft vocabulary."""
    tied = getattr(base.args, "tie_word_embeddings", False) or not hasattr(base, "lm_head")
    layer = base.model.embed_tokens if tied else base.lm_head
    idx = mx.array(ids, dtype=mx.int32)
    if "scales" in layer:  # quantized: dequantize just these rows
        biases = layer["biases"][idx] if "biases" in layer else None
        w = mx.dequantize(layer["weight"][idx], layer["scales"][idx], biases, group_size=layer.group_size,
                          bits=layer.bits, mode=getattr(layer, "mode", "affine"))
    else:
        w = layer.weight[idx]
    return idx, w


class MedusaModel(MedusaBase):
    """An mlx-lm model with Medusa heads and a tree attached (``heads`` None: plain decoding)."""

    ops = MLXOps
    backend = "mlx"
    # No load-time probe: MLX's tree is the one ``mlx_medusa tune`` grew from this backend's own
    # latency curve (the shipped tree.json, tuned on MLX on a CPU), which a few-second probe of
    # at most 8 nodes would replace with a coarser guess; the torch twin probes, its shipped
    # tree having been tuned on another machine.
    probes_at_load = False

    @classmethod
    def heads_for(cls, base, path: Path) -> MedusaHeads:
        """Heads for mlx-lm's ``base`` (also one exo loaded and sharded), in its compute dtype."""
        return load_heads(path, base.args.hidden_size, base.args.vocab_size, dtype=base.model.norm.weight.dtype)

    def __post_init__(self):
        check_supported(self.base)
        self.lm_head = base_lm_head(self.base)
        layers = self.base.model.layers
        self._attn = [layer.self_attn for layer in layers]
        self._linears = [m for layer in layers for _, m in layer.named_modules() if type(m) is nn.Linear]
        super().__post_init__()

    @property
    def num_layers(self) -> int:
        return len(self.base.model.layers)

    @property
    def config(self):
        return self.base.args

    @property
    def device(self) -> mx.Device:
        return mx.default_device()

    def detokenizer(self, tokenizer):
        return tokenizer.detokenizer  # mlx-lm's streaming detokenizer

    def reset_peak_memory(self) -> None:
        mx.reset_peak_memory()

    def peak_memory_gb(self) -> float:
        peak = mx.get_peak_memory()
        if peak == 0:  # some backends don't track; fall back to the process's peak RSS
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak / 1e9

    def make_cache(self, max_kv_size: int | None = None, keep: int = DEFAULT_KEEP) -> tuple[CacheContext, list]:
        return make_cache(self.num_layers, max_kv_size, keep)

    def make_batch_cache(self) -> tuple[BatchContext, list]:
        return make_batch_cache(self.num_layers)

    def transposes(self, rows: int) -> bool:
        """Whether a verification forward of ``rows`` tokens multiplies the transposed way."""
        return self.rows_product and 1 < rows <= self.verify_rows_max and mx.default_device() == mx.cpu

    @contextmanager
    def placed(self, caches, transposed: bool = False):
        """Within: the layers place tree tokens (``TreeRoPE``) and, if ``transposed``, use ``RowsLinear``."""
        with ExitStack() as stack:
            if isinstance(caches[0].offset, TreeOffset):
                ropes = [a.rope for a in self._attn]
                for a, r in zip(self._attn, ropes):
                    a.rope = TreeRoPE(r)
                stack.callback(lambda: [setattr(a, "rope", r) for a, r in zip(self._attn, ropes)])
            stack.enter_context(swapped_class(self._linears, RowsLinear if transposed else None))
            yield

    def hidden(self, tokens, caches, transposed: bool = False) -> mx.array:
        """Normed last hidden states (T, H) of ``tokens`` (T,), or (B, T, H) of a batch's (B, T),
        placed as ``caches``' context says."""
        tokens = tokens if isinstance(tokens, mx.array) else mx.array(np.asarray(tokens))
        one = tokens.ndim == 1
        with self.placed(caches, transposed):
            h = self.base.model(tokens.astype(mx.int32)[None] if one else tokens.astype(mx.int32), cache=caches)
        return h[0] if one else h

    def logits(self, h: mx.array) -> mx.array:
        return self.lm_head(h)

    def embed(self, ids: mx.array) -> mx.array:
        return self.base.model.embed_tokens(ids)

    def draft_rows(self, ids: np.ndarray) -> tuple[mx.array, mx.array]:
        rows = lm_head_rows(self.base, ids)
        mx.eval(rows)
        return rows

    def settle(self, caches) -> None:
        mx.eval([c.state for c in caches])

    def fast_verifier(self, ctx, caches, tree, policy, fast_path: bool | None = None):
        """Greedy decoding runs one step ahead (``Lookahead``): always for plain
        decoding, as mlx-lm does; for trees on a GPU with an unbounded cache (MLX's
        CPU stream runs only a few ops ahead, so there nothing overlaps)."""
        from .lookahead import Lookahead, usable

        if fast_path is not False and usable(tree, policy, ctx):
            if tree.size == 1 or fast_path or mx.default_device() != mx.cpu:
                return Lookahead(self, ctx, caches, tree, policy)
        elif fast_path:
            raise ValueError("the lookahead fast path needs greedy acceptance, and for trees an unbounded cache")
        return None
