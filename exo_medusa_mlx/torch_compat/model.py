"""Medusa on a transformers causal LM: heads beside the model, no copied model files.

Twin of ``exo_medusa_mlx.model``. Tree tokens reach the model through the 4D
mask and ``position_ids`` the transformers forward accepts (RoPE is computed from
the per-token positions), and the K/V through ``MedusaCache``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from ..tree import TreeBuffers, build_tree, load_tree
from .cache import DEFAULT_KEEP, CacheContext, MedusaCache, make_cache
from .heads import MedusaHeads

# Families whose attention takes the 4D mask and position_ids as given and whose
# ``model.model`` returns normed hidden states: checked by tests.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Attention implementations that honour a custom 4D float mask.
SUPPORTED_ATTENTION = ("sdpa", "eager")


def topk_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest logits, best first. logits: (..., V) -> (..., k)."""
    return torch.topk(logits, k, dim=-1, sorted=True).indices


def rows_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` computed as ``(weight @ rows.T).T``.

    On a CPU, MKL (torch's BLAS) can take 1.2-3x as long for a few rows times a
    transposed weight as for the weight times a few columns: on a 2-core AMD EPYC,
    2 rows through SmolLM2's 49152x576 lm_head take 22.7 ms against 6.7 ms, and a
    2-token forward of its layers about 75 ms against 67 ms. One row costs the same
    either way. Same values up to float32 rounding.
    """
    rows = x.reshape(-1, x.shape[-1])
    y = (weight @ rows.T).T
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


def transposes(rows: int, device: torch.device) -> bool:
    """Whether ``rows_product`` pays for ``rows`` rows: 2-64 of them, on a CPU."""
    return device.type == "cpu" and 2 <= rows <= 64


class RowsLinear(nn.Linear):
    """An ``nn.Linear`` that uses ``rows_product`` while ``transposed`` is set:
    ``MedusaModel`` sets it for its tree-verification forwards only, so prefill and
    single-token steps keep transformers' own product (plain decoding stays
    bit-identical to transformers' generate). Twin of ``exo_medusa_mlx.model.RowsLinear``."""

    transposed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if RowsLinear.transposed:
            return rows_product(x, self.weight, self.bias)
        return super().forward(x)


def install_rows_linear(base: nn.Module) -> None:
    """Make the decoder layers' float linears ``RowsLinear`` (same parameters, same names)."""
    for m in base.model.layers.modules():
        if type(m) is nn.Linear and m.weight.is_floating_point():
            m.__class__ = RowsLinear


def check_supported(base: nn.Module) -> None:
    """Raise at load time for a model the tree cache can't drive exactly."""
    cfg = base.config
    mtype = getattr(cfg, "model_type", "?")
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type '{mtype}' is not supported by Medusa yet (supported: {', '.join(SUPPORTED_MODEL_TYPES)}); "
            "run it with --no-medusa or use transformers' generate"
        )
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []):
        raise ValueError(f"model type '{mtype}' with sliding-window layers is not supported by Medusa")
    attn = cfg._attn_implementation
    if attn not in SUPPORTED_ATTENTION:
        raise ValueError(f"attention implementation '{attn}' does not take a tree mask; "
                         f"load the model with attn_implementation='sdpa' or 'eager'")


@dataclass
class MedusaModel:
    """A transformers causal LM with Medusa heads and a tree attached.

    ``heads`` may be None: plain decoding through the same code.
    """

    base: nn.Module
    heads: MedusaHeads | None = None
    tree: TreeBuffers = field(default_factory=lambda: build_tree([]))
    model_id: str | None = None

    def __post_init__(self):
        check_supported(self.base)
        # Tied embeddings: transformers ties lm_head.weight to the embedding.
        self.lm_head = self.base.get_output_embeddings()
        install_rows_linear(self.base)
        self._draft = None
        # transformers 5.2x renamed ``past_key_values`` to ``cache``; earlier 5.x take the old name.
        params = inspect.signature(self.base.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        if self.heads is not None and self.tree.depth > self.heads.num_heads:
            raise ValueError(
                f"tree is {self.tree.depth} deep but the heads give {self.heads.num_heads} guesses; use a shallower tree"
            )

    @property
    def num_layers(self) -> int:
        return self.base.config.num_hidden_layers

    @property
    def vocab_size(self) -> int:
        return self.base.config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.base.config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def eos_token_ids(self) -> list[int]:
        """End tokens from the model's generation config (may list several)."""
        gen = getattr(self.base, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos is None:
            eos = self.base.config.eos_token_id
        return [] if eos is None else [int(e) for e in np.atleast_1d(eos)]

    def make_cache(self, max_kv_size: int | None = None, keep: int = DEFAULT_KEEP,
                   static_len: int | None = None) -> tuple[CacheContext, MedusaCache]:
        return make_cache(self.num_layers, max_kv_size, keep, device=self.device, dtype=self.dtype,
                          implicit_causal=self.base.config._attn_implementation == "sdpa",
                          static_len=static_len)

    def hidden(self, tokens: torch.Tensor, caches: MedusaCache) -> torch.Tensor:
        """Normed last hidden states, (1, T, H), for the forward ``caches.ctx`` began."""
        ctx = caches.ctx
        out = self.base.model(input_ids=tokens, attention_mask=ctx.mask, position_ids=ctx.positions,
                              use_cache=True, **{self._cache_arg: caches})
        return out.last_hidden_state

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head(h); 2-64 rows on a CPU through ``rows_product`` (one row: transformers' own product)."""
        if transposes(h.numel() // h.shape[-1], h.device):
            return rows_product(h, self.lm_head.weight, self.lm_head.bias)
        return self.lm_head(h)

    @torch.inference_mode()
    def project(self, h: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """(1+D, ..., V): base logits then those of the first ``depth`` heads (all if
        None), in one matmul (shared layout). Next-token heads first need the base
        model's argmax at ``h``: two passes over lm_head."""
        if self.heads is None:
            return self.logits(h)[None]
        draft = self.draft()
        if not self.heads.config.next_token:
            return self.heads.project(h, self.lm_head, num=depth, draft=draft)
        logits = self.logits(h)
        rows = self.heads.project(h, self.lm_head, base=False, num=depth, next_embeds=self._next_embeds(logits),
                                  draft=draft)
        return torch.cat([logits[None], rows])

    def _next_embeds(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Embeddings of the base model's argmax, for next-token heads (else None)."""
        if not self.heads.config.next_token:
            return None
        return self.base.get_input_embeddings()(logits.argmax(-1))

    @torch.inference_mode()
    def propose(self, h: torch.Tensor, depth: int | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
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
        logits = self.logits(h)
        states = torch.stack(self.heads.states(h, depth, self._next_embeds(logits)))  # (D, ..., H)
        return logits, ids[topk_ids(states @ w.T, k)]

    @torch.inference_mode()
    def draft(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The heads' draft vocabulary and its lm_head rows (built on first use), or None."""
        if self.heads is None or self.heads.draft_vocab is None:
            return None
        if self._draft is None:
            ids = torch.as_tensor(self.heads.draft_vocab, dtype=torch.long, device=self.device)
            self._draft = (ids, self.lm_head.weight[ids].contiguous())
        return self._draft

    def with_tree(self, tree) -> "MedusaModel":
        return MedusaModel(self.base, self.heads, load_tree(tree, self.heads.num_heads if self.heads else None),
                           self.model_id)

    @torch.inference_mode()
    def forward(self, ctx: CacheContext, caches: MedusaCache, tokens, tree: TreeBuffers | None = None) -> torch.Tensor:
        """Run ``tokens`` laid out as ``tree`` (contiguous if None) over the cache.

        tokens: (T,) ids. Returns the normed hidden states, (T, H). The caller
        commits the kept tokens with ``ctx.commit``.
        """
        tokens = torch.as_tensor(np.asarray(tokens) if not torch.is_tensor(tokens) else tokens,
                                 dtype=torch.long).to(self.device)
        if tree is None or tree.is_chain:
            ctx.begin(n=tokens.shape[0])
        else:
            ctx.begin(tree.depths, tree.mask)
        prev = RowsLinear.transposed
        RowsLinear.transposed = tree is not None and transposes(tokens.numel(), tokens.device)
        try:
            return self.hidden(tokens.view(1, -1), caches)[0]
        finally:
            RowsLinear.transposed = prev
