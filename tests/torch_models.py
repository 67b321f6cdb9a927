"""Tiny transformers models and random heads from configs, torch only (no mlx): for the
static-step tests on a CPU and the CUDA tests on machines without mlx."""

from __future__ import annotations

import torch

from exo_medusa_mlx.core.heads_format import MedusaConfig
from exo_medusa_mlx.torch_compat.heads import MedusaHeads

HIDDEN, VOCAB = 64, 96
_SMALL = dict(hidden_size=HIDDEN, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
CONFIGS = {
    "llama": dict(_SMALL, model_type="llama", tie_word_embeddings=False),
    "qwen3": dict(_SMALL, model_type="qwen3", tie_word_embeddings=True, head_dim=16),
}


def random_model(cfg: dict, dtype=torch.float32, seed: int = 0, scale: float = 2.0, device: str = "cpu"):
    """A transformers model from ``cfg``; weights ~ N(0, scale^2 / fan_in) for sharp logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(cfg)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        for p in base.parameters():
            if p.ndim == 2:
                p.normal_(0.0, scale / p.shape[1] ** 0.5)
    return base.to(device, dtype).eval()


def random_heads(hidden: int = HIDDEN, vocab: int = VOCAB, num_heads: int = 4, seed: int = 1) -> MedusaHeads:
    heads = MedusaHeads(MedusaConfig(num_heads=num_heads, hidden_size=hidden, vocab_size=vocab))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0.0, 0.3)
    return heads.eval()
