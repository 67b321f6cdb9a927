"""``mlx_medusa generate`` on the real default model, as a user runs it."""

import json
import subprocess
import sys

import numpy as np
import pytest

from exo_medusa_mlx.core.heads_format import MedusaConfig, write_heads

PROMPT = "Name three primary colors."


def run(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "exo_medusa_mlx", *args], capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-2000:]
    return p


@pytest.fixture(scope="module")
def noisy_heads(tmp_path_factory):
    """Random shared-layout heads for the default model (little acceptance)."""
    folder = tmp_path_factory.mktemp("heads")
    rng = np.random.default_rng(0)
    H, V = 576, 49152
    w = {}
    for i in range(3):
        w[f"{i}.0.linear.weight"] = (rng.standard_normal((H, H)) * 0.02).astype(np.float32)
        w[f"{i}.0.linear.bias"] = np.zeros(H, np.float32)
    write_heads(folder, w, MedusaConfig(num_heads=3, hidden_size=H, vocab_size=V))
    return folder


def test_generate_json_medusa_equals_no_medusa(noisy_heads):
    common = ["generate", "--prompt", PROMPT, "--max-tokens", "24", "--json"]
    plain = json.loads(run(*common, "--no-medusa").stdout.strip().splitlines()[-1])
    med = json.loads(run(*common, "--heads", str(noisy_heads), "--tree", "cpu-8").stdout.strip().splitlines()[-1])
    assert med["medusa"] and not plain["medusa"] and med["tree_size"] == 8
    assert med["tokens"] == plain["tokens"] and len(plain["tokens"]) > 5
    for key in ("text", "prompt_tokens", "generation_tokens", "prompt_tps", "generation_tps",
                "mean_accepted", "steps", "peak_memory_gb"):
        assert key in med
    assert plain["mean_accepted"] == 1.0


def test_generate_with_the_shipped_heads_is_lossless_and_accepts():
    common = ["generate", "--prompt", "Write a short story about a robot who learns to paint.", "--max-tokens", "24",
              "--json"]
    plain = json.loads(run(*common, "--no-medusa").stdout.strip().splitlines()[-1])
    med = json.loads(run(*common).stdout.strip().splitlines()[-1])  # no --heads: the shipped heads and tree
    assert med["medusa"] and med["tree_size"] > 1
    assert med["tokens"] == plain["tokens"] and len(plain["tokens"]) == 24
    assert med["mean_accepted"] > 1.2 and med["steps"] < plain["steps"]


def test_stats_line_printed():
    out = run("generate", "--prompt", "What is the capital of France?", "--max-tokens", "20").stdout
    assert "Paris" in out
    assert "Prompt:" in out and "tokens-per-sec" in out and "Peak memory:" in out


@pytest.mark.parametrize("args,msg", [
    (["generate", "--model", "/no/such/folder"], "no/such/folder"),
    (["generate", "--heads", "/no/such/heads"], "/no/such/heads"),
    (["generate", "--tree", "bogus"], "unknown tree 'bogus'"),
    (["bogus"], "unknown command 'bogus'"),
    (["train", "--output", "/tmp/unused", "--samples-per-prompt", "2"], "--samples-per-prompt 2"),
    (["train", "--output", "/tmp/unused", "--init-from", "/no/such/heads"], "/no/such/heads"),
    (["train", "--output", "/tmp/unused", "--draft-vocab", "-3"], "--draft-vocab -3 must be in 1..49151"),
])
def test_bad_flags_give_one_line_errors(args, msg):
    p = run(*args, check=False)
    assert p.returncode != 0
    assert msg in p.stderr and "Traceback" not in p.stderr
