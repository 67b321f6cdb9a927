"""The torch heads (``torch_compat/heads.py``): the MLX heads' files load with the same weights and
project the same logits, and a fresh block ignores its input as the reference's does."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from exo_medusa_mlx.torch_compat.heads import MedusaHeads, load_heads  # noqa: E402
from helpers.folders import save_hf_folder  # noqa: E402
from helpers.torch_models import HIDDEN, VOCAB, torch_base  # noqa: E402


@pytest.mark.parametrize("own_lm_head,next_token", [(False, False), (True, False), (False, True)])
def test_heads_roundtrip_and_project_match_mlx(own_lm_head, next_token, tmp_path):
    import mlx.core as mx

    from exo_medusa_mlx.heads import load_heads as mlx_load_heads
    from helpers.tiny import random_heads, tiny_base

    mlx_heads = random_heads(3, own_lm_head=own_lm_head, num_layers=2, next_token=next_token)
    folder = mlx_heads.save(tmp_path / "mlx")
    heads = load_heads(folder, HIDDEN, VOCAB)
    assert heads.num_heads == 3 and heads.config.own_lm_head == own_lm_head
    # torch -> file -> MLX: the same weights back.
    again = mlx_load_heads(heads.save(tmp_path / "torch"), HIDDEN, VOCAB)
    for k, v in mlx_heads.reference_weights().items():
        np.testing.assert_array_equal(again.reference_weights()[k], v, err_msg=k)

    base = tiny_base("llama")
    tb = torch_base(save_hf_folder(tmp_path / "base", "llama", base, transformers=True))
    h = np.random.default_rng(0).normal(size=(5, HIDDEN)).astype(np.float32)
    nxt = np.random.default_rng(1).integers(0, VOCAB, 5)
    e = (base.model.embed_tokens(mx.array(nxt)), tb.get_input_embeddings()(torch.from_numpy(nxt))) if next_token \
        else (None, None)
    want = np.array(mlx_heads.project(mx.array(h), base.lm_head, next_embeds=e[0]))  # (1+K, 5, V)
    got = heads.project(torch.from_numpy(h), tb.lm_head, next_embeds=e[1]).detach().numpy()
    assert got.shape == want.shape == (4, 5, VOCAB)
    assert np.abs(got - want).max() < 1e-4
    got2 = heads.project(torch.from_numpy(h), tb.lm_head, num=2, next_embeds=e[1]).detach().numpy()
    assert got2.shape == (3, 5, VOCAB) and np.abs(got2 - want[:3]).max() < 1e-4


def test_fresh_resblock_ignores_its_input():
    from exo_medusa_mlx.core.heads_format import MedusaConfig

    heads = MedusaHeads(MedusaConfig(num_heads=2, hidden_size=HIDDEN, vocab_size=VOCAB))
    x = torch.randn(3, HIDDEN)
    for head in heads.heads:
        block = head.blocks[0]
        assert not block.linear.weight.any()
        # Zero W: the block adds SiLU(b) whatever x is (the reference's init; b is not zero).
        torch.testing.assert_close(head(x) - x, torch.nn.functional.silu(block.linear.bias).expand(3, -1))
