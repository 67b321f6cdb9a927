"""The torch ``MedusaModel`` (``torch_compat/model.py``) on the tiny MLX models loaded in transformers:
``propose`` picks what ``project`` ranks first, and tree verification's row-wise linears equal
transformers' own, used for the call only."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from exo_medusa_mlx.core.tree import build_tree  # noqa: E402
from exo_medusa_mlx.torch_compat.heads import load_heads  # noqa: E402
from exo_medusa_mlx.torch_compat.model import MedusaModel  # noqa: E402
from helpers.folders import save_hf_folder  # noqa: E402
from helpers.torch_models import HIDDEN, VOCAB, torch_base  # noqa: E402


def tiny_torch_llama(tmp_path):
    """tiny.tiny_base("llama") as transformers loads it."""
    from helpers.tiny import tiny_base

    return torch_base(save_hf_folder(tmp_path / "base", "llama", tiny_base("llama"), transformers=True))


@pytest.mark.parametrize("next_token", [False, True])
@pytest.mark.parametrize("draft", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_propose_is_the_top_k_of_project(next_token, draft, k, tmp_path):
    """Decoding's ``propose`` skips the heads' full rows; it must pick what ``project`` ranks first."""
    from exo_medusa_mlx.torch_compat.array_ops import topk_ids
    from helpers.tiny import random_heads

    heads = load_heads(random_heads(3, next_token=next_token).save(tmp_path / "heads"), HIDDEN, VOCAB)
    heads.draft_vocab = np.arange(1, VOCAB, 2) if draft else None
    model = MedusaModel(tiny_torch_llama(tmp_path), heads, build_tree([[0], [0, 0]]))
    h = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(0))
    logits, guesses = model.propose(h, 2, k)
    rows = model.project(h, 2)
    # Same values up to float32 rounding: a few rows go through lm_head as (W @ h.T).T on a CPU.
    torch.testing.assert_close(logits, rows[0], rtol=0, atol=1e-5)
    assert guesses.shape == (2, 5, k)
    assert torch.equal(guesses, topk_ids(rows[1:], k))
    if draft:
        assert np.isin(guesses.numpy(), heads.draft_vocab).all()


def test_rows_linear_matches_linear_and_only_in_verification(tmp_path):
    """Tree verification on a CPU multiplies (W @ x.T).T: transformers' values up to rounding;
    other forwards (prefill, one token) keep transformers' own product, bit for bit."""
    from exo_medusa_mlx.torch_compat.model import RowsLinear

    for bias in (False, True):
        lin = torch.nn.Linear(HIDDEN, 3 * HIDDEN, bias=bias)
        x = torch.randn(1, 4, HIDDEN)
        want = lin(x)
        lin.__class__ = RowsLinear
        got = lin(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert {n for n, _ in lin.named_parameters()} == ({"weight", "bias"} if bias else {"weight"})

    model = MedusaModel(tiny_torch_llama(tmp_path))
    seen = []
    real = RowsLinear.forward
    RowsLinear.forward = lambda self, x: (seen.append(1), real(self, x))[1]
    try:
        ctx, caches = model.make_cache()
        model.forward(ctx, caches, [1, 2, 3])  # a contiguous run (prefill): transformers' product
        ctx.commit(caches, np.arange(3))
        assert not seen
        model.forward(ctx, caches, [4, 5, 6], build_tree([[0], [1]]))  # a tree: transposed
        assert seen
        # For the call only: between calls the model is transformers' own.
        assert not any(type(m) is RowsLinear for m in model.base.modules())
    finally:
        RowsLinear.forward = real
