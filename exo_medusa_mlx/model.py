"""Medusa on mlx-lm's own model classes: heads beside the model, no copied model files."""

from __future__ import annotations

from contextlib import contextmanager
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
VERIFY_TRANSPOSED_MAX = 64  # beyond this many rows, the two products cost about the same


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


def topk_ids(logits: mx.array, k: int) -> mx.array:
    """Indices of the k largest logits, best first. logits: (..., V) -> (..., k)."""
    if k == 1:
        return mx.argmax(logits, axis=-1, keepdims=True)
    idx = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
    vals = mx.take_along_axis(logits, idx, axis=-1)
    return mx.take_along_axis(idx, mx.argsort(-vals, axis=-1), axis=-1)


class RowsLinear(nn.Linear):
    """An ``nn.Linear`` that can compute ``(W @ x.T).T`` instead of ``x @ W.T``.

    On a CPU, OpenBLAS takes 1.4-1.6x as long to multiply a few rows by a
    transposed weight matrix as to multiply the weight matrix by a few columns
    (SmolLM2's MLP projections, 2 to 16 rows; 1.1x at 64). Tree verification
    feeds a few rows, so ``MedusaModel`` turns this on (``transposed``) for its
    verification forwards on a CPU only; prefill and single-token steps keep
    mlx-lm's own product, so plain decoding stays bit-identical to mlx-lm's.
    """

    transposed = False  # set for the graph being built (MLX is lazy: at call time)

    def __call__(self, x: mx.array) -> mx.array:
        if not RowsLinear.transposed:
            return super().__call__(x)
        rows = x.reshape(-1, x.shape[-1])
        y = (self.weight @ rows.T).T
        if "bias" in self:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def install_rows_linear(base) -> None:
    """Make the decoder layers' float linears ``RowsLinear`` (same parameters, same names)."""
    for layer in base.model.layers:
        for _, m in layer.named_modules():
            if type(m) is nn.Linear:
                m.__class__ = RowsLinear


@contextmanager
def transposed_linears(on: bool):
    """Build the graph of a forward with ``RowsLinear`` computing ``(W @ x.T).T``."""
    prev, RowsLinear.transposed = RowsLinear.transposed, on
    try:
        yield
    finally:
        RowsLinear.transposed = prev


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
        install_rows_linear(self.base)
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

    def hidden(self, tokens: mx.array, cache, verify: bool = False) -> mx.array:
        """Normed last hidden states, (B, T, H). ``verify``: a verification forward of
        a few tokens (on a CPU, its linears multiply the transposed way, ``RowsLinear``)."""
        few = verify and 1 < tokens.size <= VERIFY_TRANSPOSED_MAX and mx.default_device() == mx.cpu
        with transposed_linears(few):
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
        rows = self.heads.project(h, self.lm_head, base=False, num=depth, next_embeds=self._next_embeds(logits),
                                  draft=draft)
        return mx.concatenate([logits[None], rows])

    def _next_embeds(self, logits: mx.array) -> mx.array | None:
        """Embeddings of the base model's argmax, for next-token heads (else None)."""
        if not self.heads.config.next_token:
            return None
        return self.base.model.embed_tokens(mx.argmax(logits, axis=-1))

    def propose(self, h: mx.array, depth: int | None, k: int) -> tuple[mx.array, mx.array]:
        """What a decoding step needs at ``h`` (..., H): the base logits (..., V) and
        the first ``depth`` heads' top-``k`` guesses (D, ..., k), best first.

        The guesses equal ``topk_ids(project(h, depth)[1:], k)`` but, with a draft
        vocabulary, the heads' full rows are never built: the top-k is taken over
        the draft's scores and mapped to token ids.
        """
        draft = self.draft()  # None without heads
        if draft is None:
            rows = self.project(h, depth)
            return rows[0], topk_ids(rows[1:], k)
        ids, w = draft
        logits = self.lm_head(h)
        states = mx.stack(self.heads.states(h, depth, self._next_embeds(logits)))  # (D, ..., H)
        return logits, ids[topk_ids(states @ w.T, k)]

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

    def forward(self, ctx: CacheContext, caches, tokens, tree: TreeBuffers | None = None,
                placed: tuple[mx.array, mx.array | TreeOffset] | None = None) -> mx.array:
        """Run ``tokens`` laid out as ``tree`` (contiguous if None) over the cache.

        tokens: (T,) ids. Returns the normed hidden states, (T, H). The caller
        commits the kept tokens with ``ctx.commit``. ``placed``: (mask, RoPE offset)
        computed on the device, for pipelined decoding; the tokens then stay in the
        slots they are written to, and nothing is committed.
        """
        tokens = mx.array(tokens) if not isinstance(tokens, mx.array) else tokens
        if placed is not None:
            ctx.begin_on_device(*placed)
        elif tree is None or tree.is_chain:
            ctx.begin(n=tokens.shape[0])
        else:
            ctx.begin(tree.depths, tree.mask)
        h = self.hidden(tokens.astype(mx.int32)[None], caches, verify=tree is not None)[0]
        if placed is not None:
            ctx.keep_in_place(tokens.shape[0])
        return h
