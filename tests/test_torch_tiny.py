"""Tiny models shared by both backends: the MLX tiny models saved as HF folders.

Helpers for the other ``test_torch_*`` files, and the tests that the saved
folders and heads load with identical weights in transformers and MLX.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from exo_medusa_mlx.torch_compat.heads import MedusaHeads, load_heads  # noqa: E402
from exo_medusa_mlx.torch_compat.model import MedusaModel  # noqa: E402
from oracle import OracleHeads, take  # noqa: E402, F401  (take: test_torch_cuda imports it from here)

# Tiny models gain nothing from threads, and on shared cores OpenMP's spin-waiting
# makes a second torch thread ~10x slower: every torch test module imports this one.
torch.set_num_threads(1)

# tests/tiny.py's sizes; mlx is imported only where needed, so the CUDA tests
# (on machines without mlx) can share the helpers below.
HIDDEN, VOCAB = 64, 96
ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM"}


def save_hf_folder(base, family: str, folder: Path) -> Path:
    """Write an mlx-lm tiny model as a Hugging Face folder (config.json + float32 safetensors)."""
    from mlx.utils import tree_flatten
    from safetensors.numpy import save_file

    from tiny import CONFIGS

    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: np.array(v, dtype=np.float32) for k, v in tree_flatten(base.parameters())}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(CONFIGS[family], architectures=[ARCH[family]], torch_dtype="float32",
               bos_token_id=None, eos_token_id=None, pad_token_id=None)  # no EOS: generate runs to the end
    if family == "mistral":
        cfg["sliding_window"] = None  # mlx-lm's llama class (which runs mistral) has none
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def torch_base(folder: Path, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation=attn).eval()


def tiny_pair(family: str, root: Path, num_heads: int = 4, seed: int = 0):
    """(mlx base, torch base, heads folder): the same weights, the same random heads."""
    from tiny import random_heads, tiny_base

    base = tiny_base(family, seed)
    folder = save_hf_folder(base, family, root / family)
    heads_dir = random_heads(num_heads).save(root / f"{family}-heads")
    return base, torch_base(folder), heads_dir


def hf_greedy(base, prompt, n) -> list[int]:
    """transformers' own greedy generate: the oracle for the torch path."""
    with torch.inference_mode():
        ids = torch.from_numpy(np.asarray(prompt))[None].to(base.device)
        out = base.generate(ids, do_sample=False, max_new_tokens=n)
    return out[0, len(prompt):].tolist()


class TorchOracleMedusa(OracleHeads, MedusaModel):
    """Heads that know the plain greedy continuation ``future`` (as tests/tiny.py's OracleMedusa).

    Head i's guesses for position p put the true token at a rank drawn from ``ranks``.
    """

    def project(self, h, depth=None):
        """(1+D, V) at the last committed position, or (1+D, T, V) at each node in flight."""
        rows = super().project(h, depth)
        return torch.from_numpy(self.rigged(rows.float().cpu().numpy(), h.dim() == 1)).to(rows)

    def node_positions(self, caches, T):
        return caches.ctx.positions.reshape(-1).cpu().numpy()


# --------------------------------------------------------------------------- tests


def test_sizes_are_tinys():
    import tiny

    assert (HIDDEN, VOCAB) == (tiny.CONFIGS["llama"]["hidden_size"], tiny.VOCAB)


@pytest.mark.parametrize("family", list(ARCH))
def test_hf_folder_has_the_mlx_weights(family, tmp_path):
    from mlx.utils import tree_flatten

    from tiny import CONFIGS

    base, tb, _ = tiny_pair(family, tmp_path)
    ours = {k: np.array(v) for k, v in tree_flatten(base.parameters())}
    theirs = {k: v.numpy() for k, v in tb.state_dict().items()}
    if CONFIGS[family]["tie_word_embeddings"]:
        assert "lm_head.weight" not in ours
        np.testing.assert_array_equal(theirs.pop("lm_head.weight"), ours["model.embed_tokens.weight"])
    assert sorted(theirs) == sorted(ours)
    for k in ours:
        np.testing.assert_array_equal(theirs[k], ours[k], err_msg=k)


@pytest.mark.parametrize("own_lm_head,next_token", [(False, False), (True, False), (False, True)])
def test_heads_roundtrip_and_project_match_mlx(own_lm_head, next_token, tmp_path):
    import mlx.core as mx

    from exo_medusa_mlx.heads import load_heads as mlx_load_heads
    from tiny import random_heads, tiny_base

    mlx_heads = random_heads(3, own_lm_head=own_lm_head, num_layers=2, next_token=next_token)
    folder = mlx_heads.save(tmp_path / "mlx")
    heads = load_heads(folder, HIDDEN, VOCAB)
    assert heads.num_heads == 3 and heads.config.own_lm_head == own_lm_head
    # torch -> file -> MLX: the same weights back.
    again = mlx_load_heads(heads.save(tmp_path / "torch"), HIDDEN, VOCAB)
    for k, v in mlx_heads.reference_weights().items():
        np.testing.assert_array_equal(again.reference_weights()[k], v, err_msg=k)

    base = tiny_base("llama")
    tb = torch_base(save_hf_folder(base, "llama", tmp_path / "base"))
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


@pytest.mark.parametrize("next_token", [False, True])
@pytest.mark.parametrize("draft", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_propose_is_the_top_k_of_project(next_token, draft, k, tmp_path):
    """Decoding's ``propose`` skips the heads' full rows; it must pick what ``project`` ranks first."""
    from exo_medusa_mlx.torch_compat.array_ops import topk_ids
    from exo_medusa_mlx.core.tree import build_tree
    from tiny import random_heads, tiny_base

    heads = load_heads(random_heads(3, next_token=next_token).save(tmp_path / "heads"), HIDDEN, VOCAB)
    heads.draft_vocab = np.arange(1, VOCAB, 2) if draft else None
    model = MedusaModel(torch_base(save_hf_folder(tiny_base("llama"), "llama", tmp_path / "base")), heads,
                        build_tree([[0], [0, 0]]))
    h = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(0))
    logits, guesses = model.propose(h, 2, k)
    rows = model.project(h, 2)
    # Same values up to float32 rounding: a few rows go through lm_head as (W @ h.T).T on a CPU.
    torch.testing.assert_close(logits, rows[0], rtol=0, atol=1e-5)
    assert guesses.shape == (2, 5, k)
    assert torch.equal(guesses, topk_ids(rows[1:], k))
    if draft:
        assert np.isin(guesses.numpy(), heads.draft_vocab).all()


def test_fresh_resblock_ignores_its_input():
    from exo_medusa_mlx.core.heads_format import MedusaConfig

    heads = MedusaHeads(MedusaConfig(num_heads=2, hidden_size=HIDDEN, vocab_size=VOCAB))
    x = torch.randn(3, HIDDEN)
    for head in heads.heads:
        block = head.blocks[0]
        assert not block.linear.weight.any()
        # Zero W: the block adds SiLU(b) whatever x is (the reference's init; b is not zero).
        torch.testing.assert_close(head(x) - x, torch.nn.functional.silu(block.linear.bias).expand(3, -1))


def test_rows_linear_matches_linear_and_only_in_verification(tmp_path):
    """Tree verification on a CPU multiplies (W @ x.T).T: transformers' values up to rounding;
    other forwards (prefill, one token) keep transformers' own product, bit for bit."""
    from exo_medusa_mlx.torch_compat.model import RowsLinear
    from exo_medusa_mlx.core.tree import build_tree
    from tiny import tiny_base

    for bias in (False, True):
        lin = torch.nn.Linear(HIDDEN, 3 * HIDDEN, bias=bias)
        x = torch.randn(1, 4, HIDDEN)
        want = lin(x)
        lin.__class__ = RowsLinear
        got = lin(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert {n for n, _ in lin.named_parameters()} == ({"weight", "bias"} if bias else {"weight"})

    model = MedusaModel(torch_base(save_hf_folder(tiny_base("llama"), "llama", tmp_path / "base")))
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
