"""GPU check of the torch path: step and verify times on a Llama-7B shape, random bf16 weights.

Times one forward of N new tokens over a 512-token cache (N = 1 is a decode step,
N = 16/64/128 a tree verify), eager and replayed from a CUDA graph, plus whole
decode loops (plain and Medusa) through ``generate_step``. Nothing is downloaded.

    python scripts/gpu_step_bench.py [--small]   # --small: SmolLM2-135M shape
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from exo_medusa_mlx.core.heads_format import MedusaConfig
from exo_medusa_mlx.core.step import generate_step, prefill
from exo_medusa_mlx.torch_compat.graphs import GraphedVerifier
from exo_medusa_mlx.torch_compat.heads import MedusaHeads
from exo_medusa_mlx.torch_compat.model import MedusaModel
from exo_medusa_mlx.core.accept import make_policy
from exo_medusa_mlx.core.tree import ROOT_ONLY, build_tree, chain, load_tree

SHAPES = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
}
TREES = {1: [], 16: "cpu-16", 64: "mc_sim_7b_63", 128: chain(127)}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t) / iters * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=list(SHAPES), default="llama-7b")
    ap.add_argument("--cache-len", type=int, default=512)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=4096, attn_implementation="sdpa")
    torch.set_default_dtype(torch.bfloat16)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke run, eager only
    modes = ("eager", "graph") if dev == "cuda" else ("eager",)
    with torch.device(dev):
        base = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, args.cache_len)
    out = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "shape": args.shape, "cache_len": args.cache_len,
           "torch": torch.__version__, "verify_ms": {}}
    heads = MedusaHeads(MedusaConfig(num_heads=4, hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size)).to(
        dev, torch.bfloat16)
    with torch.inference_mode():
        for n, spec in TREES.items():
            tree = load_tree(spec) if isinstance(spec, str) else build_tree(spec)
            model = MedusaModel(base)  # the forward of the tree's tokens (chains beyond the heads' depth too)
            row = {}
            for mode in modes:
                ctx, caches = model.make_cache()
                prefill(model, ctx, caches, prompt)
                toks = np.random.default_rng(n).integers(0, cfg.vocab_size, tree.size)
                if mode == "eager":
                    def fn():
                        h = model.forward(ctx, caches, toks, tree)
                        return model.logits(h)
                else:
                    verify = GraphedVerifier(model, ctx, caches, tree, make_policy())

                    def fn():
                        return verify.verify(toks)
                row[mode] = round(timed(fn, args.iters), 3)
            out["verify_ms"][tree.size] = row
            print(f"N={tree.size:4d}  " + "   ".join(f"{m} {v:7.2f} ms" for m, v in row.items()), flush=True)
        # Whole loops through generate_step: plain decoding, then Medusa with random heads on mc_sim_7b_63.
        for name, model, medusa in (("plain", MedusaModel(base, None, build_tree([])), False),
                                    ("medusa-64", MedusaModel(base, heads, load_tree("mc_sim_7b_63")), True)):
            for graphs in (False, True) if dev == "cuda" else (False,):
                steps = generate_step(prompt, model, tree=None if medusa else ROOT_ONLY, fast_path=graphs)
                next(steps)
                for _ in range(3):
                    next(steps)
                sync()
                t, n = time.perf_counter(), 0
                for _ in range(args.tokens):
                    n += len(next(steps).tokens)
                sync()
                ms = (time.perf_counter() - t) / args.tokens * 1e3
                key = f"{name}-{'graph' if graphs else 'eager'}"
                out[key + "_ms_per_step"] = round(ms, 3)
                print(f"{key:18s} {ms:7.2f} ms per step, {n / args.tokens:.2f} tokens per step", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
