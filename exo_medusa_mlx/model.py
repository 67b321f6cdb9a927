"""Medusa on mlx-lm's own model classes: heads beside the model, no copied model files."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import DEFAULT_KEEP, CacheContext, TreeOffset, make_cache
from .heads import MedusaHeads
from .tree import TreeBuffers, build_tree

# Families whose attention reads ``cache.offset`` for RoPE and ``cache.make_mask``
# for the mask, and whose model returns normed hidden states: checked by tests.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class TreeRoPE(nn.Module):
    """Wraps a layer's RoPE so tree tokens can sit at per-token positions.

    ``mx.fast.rope`` takes one offset per batch row, so the tokens are moved to the
    batch axis, rotated each at its own position, and moved back.
    """

    def __init__(self, rope):
        super().__init__()
        self.inner = rope

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        if not isinstance(offset, TreeOffset):
            return self.inner(x, offset=offset)
        B, H, T, D = x.shape
        y = x.transpose(0, 2, 1, 3).reshape(B * T, H, 1, D)  # (B*T, H, 1, D)
        pos = mx.tile(offset.positions, (B,))
        y = self.inner(y, offset=pos)
        return y.reshape(B, T, H, D).transpose(0, 2, 1, 3)


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


def install_tree_rope(base) -> None:
    for layer in base.model.layers:
        if not isinstance(layer.self_attn.rope, TreeRoPE):
            layer.self_attn.rope = TreeRoPE(layer.self_attn.rope)


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


@dataclass
class MedusaModel:
    """An mlx-lm model with Medusa heads and a tree attached.

    ``heads`` may be None: plain decoding through the same code.
    """

    base: nn.Module
    heads: MedusaHeads | None = None
    tree: TreeBuffers = field(default_factory=lambda: build_tree([]))
    model_id: str | None = None

    def __post_init__(self):
        check_supported(self.base)
        install_tree_rope(self.base)
        self.lm_head = base_lm_head(self.base)
        self._draft = None
        if self.heads is not None and self.tree.depth > self.heads.num_heads:
            raise ValueError(
                f"tree is {self.tree.depth} deep but the heads give {self.heads.num_heads} guesses; use a shallower tree"
            )

    @property
    def num_layers(self) -> int:
        return len(self.base.model.layers)

    @property
    def vocab_size(self) -> int:
        return self.base.args.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.base.args.hidden_size

    def make_cache(self, max_kv_size: int | None = None, keep: int = DEFAULT_KEEP) -> tuple[CacheContext, list]:
        return make_cache(self.num_layers, max_kv_size, keep)

    def hidden(self, tokens: mx.array, cache) -> mx.array:
        """Normed last hidden states, (B, T, H)."""
        return self.base.model(tokens, cache=cache)

    def logits(self, h: mx.array) -> mx.array:
        return self.lm_head(h)

    def project(self, h: mx.array, depth: int | None = None) -> mx.array:
        """(1+D, ..., V): base logits then those of the first ``depth`` heads (all if
        None), in one matmul (shared layout). Next-token heads first need the base
        model's argmax at ``h``: two passes over lm_head."""
        if self.heads is None:
            return self.lm_head(h)[None]
        draft = self.draft()
        if not self.heads.config.next_token:
            return self.heads.project(h, self.lm_head, num=depth, draft=draft)
        logits = self.lm_head(h)
        nxt = self.base.model.embed_tokens(mx.argmax(logits, axis=-1))
        rows = self.heads.project(h, self.lm_head, base=False, num=depth, next_embeds=nxt, draft=draft)
        return mx.concatenate([logits[None], rows])

    def draft(self) -> tuple[mx.array, mx.array] | None:
        """The heads' draft vocabulary and its lm_head rows (built on first use), or None."""
        if self.heads is None or self.heads.draft_vocab is None:
            return None
        if self._draft is None:
            self._draft = lm_head_rows(self.base, self.heads.draft_vocab)
            mx.eval(self._draft)
        return self._draft

    def with_tree(self, tree) -> "MedusaModel":
        from .tree import load_tree

        return MedusaModel(self.base, self.heads, load_tree(tree, self.heads.num_heads if self.heads else None),
                           self.model_id)

    def forward(self, ctx: CacheContext, caches, tokens, tree: TreeBuffers | None = None) -> mx.array:
        """Run ``tokens`` laid out as ``tree`` (contiguous if None) over the cache.

        tokens: (T,) ids. Returns the normed hidden states, (T, H). The caller
        commits the kept tokens with ``ctx.commit``.
        """
        tokens = mx.array(tokens) if not isinstance(tokens, mx.array) else tokens
        if tree is None or tree.is_chain:
            ctx.begin(n=tokens.shape[0])
        else:
            ctx.begin(tree.depths, tree.mask)
        return self.hidden(tokens.astype(mx.int32)[None], caches)[0]
