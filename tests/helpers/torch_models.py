"""Tiny torch models: transformers models and random heads from configs (no mlx, for the static-step
tests on a CPU and the CUDA tests on machines without mlx); the tiny MLX models loaded in
transformers (``tiny_pair``, mlx imported there only); transformers' own greedy ``generate``, the
oracle for the torch path; oracle heads for the torch ``MedusaModel``.

Importing this module sets one torch thread: tiny models gain nothing from more, and on shared
cores OpenMP's spin-waiting makes a second torch thread ~10x slower."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from exo_medusa_mlx.core.dynamic import Calibration, DynamicTree, make_dynamic
from exo_medusa_mlx.core.heads_format import MedusaConfig
from exo_medusa_mlx.torch_compat.heads import MedusaHeads
from exo_medusa_mlx.torch_compat.model import MedusaModel
from helpers.oracle import OracleHeads

torch.set_num_threads(1)

HIDDEN, VOCAB = 64, 96  # tiny.py's sizes
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


def dynamic_plan(n: int = 12, slope: float = 0.06) -> DynamicTree:
    """A dynamic tree for ``random_heads()`` (4 heads): cost 1 + ``slope`` per node. Oracle heads put
    <= 0.1 on their top guess: the calibration lifts them, so trees of 8 or 12 nodes are picked."""
    return make_dynamic(n, 4, VOCAB, 1 + slope * np.maximum(np.arange(n + 1) - 1, 0),
                        Calibration((1.0, 1.0, 0.5, 0.0), (1.0,) * 4))


def torch_base(folder: Path, attn: str = "sdpa"):
    """A saved folder loaded by transformers, float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation=attn).eval()


def tiny_pair(family: str, root: Path, num_heads: int = 4, seed: int = 0):
    """(mlx base, torch base, heads folder): the same weights, the same random heads."""
    from helpers.folders import save_hf_folder
    from helpers.tiny import random_heads as mlx_random_heads
    from helpers.tiny import tiny_base

    base = tiny_base(family, seed)
    folder = save_hf_folder(root / family, family, base, transformers=True)
    heads_dir = mlx_random_heads(num_heads).save(root / f"{family}-heads")
    return base, torch_base(folder), heads_dir


def hf_greedy(base, prompt, n) -> list[int]:
    """transformers' own greedy generate: the oracle for the torch path."""
    with torch.inference_mode():
        ids = torch.from_numpy(np.asarray(prompt))[None].to(base.device)
        out = base.generate(ids, do_sample=False, max_new_tokens=n)
    return out[0, len(prompt):].tolist()


class TorchOracleMedusa(OracleHeads, MedusaModel):
    """Heads that know the plain greedy continuation ``future`` (as tiny.OracleMedusa).

    Head i's guesses for position p put the true token at a rank drawn from ``ranks``.
    """

    def project(self, h, depth=None):
        """(1+D, V) at the last committed position, or (1+D, T, V) at each node in flight."""
        rows = super().project(h, depth)
        return torch.from_numpy(self.rigged(rows.float().cpu().numpy(), h.dim() == 1)).to(rows)

    def node_positions(self, caches, T):
        return caches.ctx.positions.reshape(-1).cpu().numpy()
