"""The GPU scripts keep working at tiny sizes (on a CPU; on CUDA the graphed paths too).

scripts/gpu_step_bench.py: every path runs, its hand-written reference is a real Llama
(== transformers' logits) and the fast paths give the dynamic step's tokens;
scripts/gpu_e2e.py: Medusa gives plain decoding's tokens on each backend. Timings
are printed by the scripts, never asserted.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from helpers import torch_models  # noqa: E402,F401  (one torch thread: tiny models gain nothing from more)
from helpers.processes import load_script  # noqa: E402


@pytest.fixture(scope="module")
def bench():
    return load_script("gpu_step_bench")


def test_bench_runs_every_path_at_tiny_sizes(bench, tmp_path, capsys):
    out = bench.main(["--size", "tiny", "--cache-len", "24", "--iters", "2", "--tokens", "8",
                      "--json", str(tmp_path / "out.json")])
    cuda = torch.cuda.is_available()
    modes = {"dynamic", "static", "reference"} | ({"graph", "reference-graph"} if cuda else set())
    assert [s["shape"] for s in out["shapes"]] == list(bench.SHAPES)
    for s in out["shapes"]:
        assert s["tiny"] and s["reference_max_logit_error"] < (1e-4 if cuda else 1e-5)
        assert list(s["step_ms"]) == list(bench.SIZES)
        assert all(set(row) == modes and min(row.values()) > 0 for row in s["step_ms"].values())
        loops = s["generate_step"]
        assert loops["plain-same-tokens"] and loops["medusa-64-same-tokens"]
        fast = "graph" if cuda else "static"
        assert {f"plain-{fast}", f"medusa-64-{fast}", "plain-dynamic", "medusa-64-dynamic"} <= set(loops)
    assert (tmp_path / "out.json").exists() and "ours/reference" in capsys.readouterr().out


def test_reference_decodes_as_transformers(bench):
    """Steps over its static cache after a prefill: transformers' logits for those positions."""
    model, _ = bench.make_model("smollm2-135m", True, "cpu", torch.float32)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, model.vocab_size, 32))
    with torch.inference_mode():
        want = model.base(ids[None]).logits[0]
    ref = bench.ReferenceLlama(model.base, 64)
    ref.step(ids[:24], torch.arange(24))
    got = torch.cat([ref.step(ids[24:28], torch.arange(24, 28)), ref.step(ids[28:], torch.arange(28, 32))])
    torch.testing.assert_close(got, want[24:], rtol=0, atol=1e-5)


def test_the_128_token_tree(bench):
    tree = bench.tree_of(128)
    assert tree.size == 128 and tree.depth == 4 and {bench.tree_of(n).size for n in bench.SIZES} == set(bench.SIZES)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_e2e_gives_plain_tokens_on_each_backend(backend, tmp_path):
    """scripts/gpu_e2e.py on a tiny model folder with heads: Medusa's tokens == plain decoding's."""
    pytest.importorskip("mlx")  # the tiny folder is built from an MLX model
    from helpers.folders import save_hf_folder
    from helpers.tiny import N_LAYERS, random_heads, tiny_base

    folder = save_hf_folder(tmp_path / "llama", "llama", tiny_base("llama", layers=N_LAYERS), random_heads(4))
    e2e = load_script("gpu_e2e")
    out = e2e.main(["--backend", backend, "--model", str(folder), "--tree", "default", "--tree", "cpu-16",
                    "--limit", "2", "--max-tokens", "12"])
    assert set(out["methods"]) == {"plain", "default", "cpu-16"}
    assert all(r["identical"] == "2/2" and r["tok_per_s"] > 0 for r in out["methods"].values())
