"""Medusa on a transformers causal LM: heads beside the model, no copied model files.

Twin of ``exo_medusa_mlx.model``. Tree tokens reach the model through the 4D
mask and ``position_ids`` the transformers forward accepts (RoPE is computed from
the per-token positions), and the K/V through ``MedusaCache``.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..core.base import MedusaBase, swapped_class
from .array_ops import TorchOps
from .heads import MedusaHeads, load_heads
from .cache import DEFAULT_KEEP, BatchContext, CacheContext, MedusaCache, make_batch_cache, make_cache

# Families whose attention takes the 4D mask and position_ids as given and whose
# ``model.model`` returns normed hidden states: checked by tests.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Attention implementations that honour a custom 4D float mask.
SUPPORTED_ATTENTION = ("sdpa", "eager")


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
    """An ``nn.Linear`` computing ``rows_product``. ``MedusaModel`` runs the decoder
    layers' linears as this class for the call of a tree-verification forward on a
    CPU only, so prefill and single-token steps keep transformers' own product
    (plain decoding stays bit-identical to transformers' generate)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rows_product(x, self.weight, self.bias)


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


class MedusaModel(MedusaBase):
    """A transformers causal LM with Medusa heads and a tree attached (``heads`` None: plain decoding)."""

    ops = TorchOps
    backend = "torch"
    probes_at_load = True  # its shipped tree.torch.json was tuned on another machine (see ``model.MedusaModel``)

    @classmethod
    def heads_for(cls, base, path: Path) -> MedusaHeads:
        """Heads for transformers' ``base``, in its lm_head's dtype and on its device."""
        head = base.get_output_embeddings().weight
        return load_heads(path, base.config.hidden_size, base.config.vocab_size, dtype=head.dtype, device=head.device)

    def __post_init__(self):
        check_supported(self.base)
        # Tied embeddings: transformers ties lm_head.weight to the embedding.
        self.lm_head = self.base.get_output_embeddings()
        self._linears = [m for m in self.base.model.layers.modules()
                         if type(m) is nn.Linear and m.weight.is_floating_point()]
        # transformers 5.2x renamed ``past_key_values`` to ``cache``; earlier 5.x take the old name.
        params = inspect.signature(self.base.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        super().__post_init__()

    @property
    def num_layers(self) -> int:
        return self.base.config.num_hidden_layers

    @property
    def config(self):
        return self.base.config

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def eos_token_ids(self) -> list[int]:
        """End tokens from the model's generation config (may list several): a bare transformers
        tokenizer (no ``eos_token_ids``) ends on these and its own (``core.tokens.eos_ids``)."""
        gen = getattr(self.base, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos is None:
            eos = self.base.config.eos_token_id
        return [] if eos is None else [int(e) for e in np.atleast_1d(eos)]

    def detokenizer(self, tokenizer):
        from .generate import StreamingDetokenizer

        return getattr(tokenizer, "detokenizer", None) or StreamingDetokenizer(tokenizer)

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9

    def make_cache(self, max_kv_size: int | None = None, keep: int = DEFAULT_KEEP) -> tuple[CacheContext, MedusaCache]:
        return make_cache(self.num_layers, max_kv_size, keep, device=self.device, dtype=self.dtype,
                          implicit_causal=self.base.config._attn_implementation == "sdpa")

    def make_batch_cache(self) -> tuple[BatchContext, MedusaCache]:
        return make_batch_cache(self.num_layers, device=self.device, dtype=self.dtype)

    def transposes(self, rows: int) -> bool:
        """Whether ``rows_product`` pays for ``rows`` rows: 2-64 of them, on a CPU (unless turned off)."""
        return self.rows_product and transposes(rows, self.device)

    def placed(self, caches=None, transposed: bool = False):
        """Within: the decoder layers' linears are ``RowsLinear`` if ``transposed`` (as
        MLX's ``placed``; the tree's positions reach transformers as ``position_ids``)."""
        return swapped_class(self._linears, RowsLinear if transposed else None)

    @torch.inference_mode()
    def hidden(self, tokens, caches: MedusaCache, transposed: bool = False) -> torch.Tensor:
        """Normed last hidden states (T, H) of ``tokens`` (T,), or (B, T, H) of a batch's (B, T), for the
        forward ``caches.ctx`` began."""
        ctx = caches.ctx
        tokens = torch.as_tensor(tokens if torch.is_tensor(tokens) else np.asarray(tokens), dtype=torch.long)
        one = tokens.ndim == 1
        with self.placed(caches, transposed):
            out = self.base.model(input_ids=tokens.to(self.device).view(1, -1) if one else tokens.to(self.device),
                                  attention_mask=ctx.mask, position_ids=ctx.positions, use_cache=True,
                                  **{self._cache_arg: caches})
        return out.last_hidden_state[0] if one else out.last_hidden_state

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head(h); 2-64 rows on a CPU through ``rows_product`` (one row: transformers' own product)."""
        if self.transposes(h.numel() // h.shape[-1]):
            return rows_product(h, self.lm_head.weight, self.lm_head.bias)
        return self.lm_head(h)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base.get_input_embeddings()(ids)

    @torch.inference_mode()
    def draft_rows(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return idx, self.lm_head.weight[idx].contiguous()

    # Inference mode (no autograd bookkeeping) for the neutral methods that run the heads.
    @torch.inference_mode()
    def propose(self, h, depth, k, logprobs=False):
        return super().propose(h, depth, k, logprobs)

    @torch.inference_mode()
    def project(self, h, depth=None):
        return super().project(h, depth)

    @torch.inference_mode()
    def propose_tree(self, h, tree):
        return super().propose_tree(h, tree)

    @torch.inference_mode()
    def propose_scored(self, h, plan):
        return super().propose_scored(h, plan)

    def fast_verifier(self, ctx, caches, tree, policy, fast_path: bool | None = None):
        """The fast path (``graphs.fast_verifier``): on CUDA the static step replayed from a CUDA
        graph; on a CPU when asked (``fast_path=True``), the same static step run eagerly."""
        from .graphs import fast_verifier

        cls = fast_verifier(self.device, fast_path)
        return None if cls is None else cls(self, ctx, caches, tree, policy)
