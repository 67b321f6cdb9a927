"""Step times of the torch path against a hand-written PyTorch Llama step, eager and CUDA-graphed.

For each model shape (Llama-7B and the default model's, SmolLM2-135M; random
weights, bf16 on CUDA): a reference decode step written here the gpt-fast way
(static KV cache, fused projections, no framework), our plain step and our
verify step for 1/16/64/128 tree tokens over ``--cache-len`` cached tokens, and
whole ``generate_step`` loops (plain, and Medusa on ``mc_sim_7b_63`` with random
heads) per token. Every timed step ends with its verdict on the host, as decoding
needs. Modes: ``dynamic`` (the step's default verifier, host-built mask),
``static`` (the fast path's static step, device-side step data, eager) and
``graph`` (the same replayed from a CUDA graph; CUDA only). Without CUDA the same
code runs at tiny sizes in float32 (``--size tiny``; tests/test_gpu_scripts.py).

    python scripts/gpu_step_bench.py [--shapes llama-7b smollm2-135m] [--json out.json]

Targets (issue 22): graphed verify within 1.2x of the graphed reference at 16/64/128 tokens, plain within 1.1x.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from exo_medusa_mlx.core.accept import make_policy
from exo_medusa_mlx.core.heads_format import MedusaConfig
from exo_medusa_mlx.core.step import Sequence, Verifier, generate_step, prefill
from exo_medusa_mlx.core.tree import ROOT_ONLY, TreeBuffers, build_tree, load_tree, tree_choices
from exo_medusa_mlx.torch_compat.graphs import GraphedVerifier, capture
from exo_medusa_mlx.torch_compat.heads import MedusaHeads
from exo_medusa_mlx.torch_compat.model import MedusaModel
from exo_medusa_mlx.torch_compat.static import StaticVerifier

SHAPES = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True),
}
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=96)  # per shape: heads kept
TINY_HEADS = {"llama-7b": (4, 4), "smollm2-135m": (4, 2)}  # attention / KV heads: MHA and GQA as the full shapes
SIZES = (1, 16, 64, 128)


class ReferenceLlama:
    """A Llama forward over a static KV cache, written by hand the gpt-fast way: fused QKV and
    gate/up weights, HF's RoPE layout (so transformers' weights load as they are), a bool mask
    ``causal[pos]`` over all ``S`` slots. ``step(tokens, pos)`` -> logits (T, V)."""

    @torch.no_grad()
    def __init__(self, hf, S: int):
        c, m = hf.config, hf.model
        self.nh, self.nkv, self.eps = c.num_attention_heads, c.num_key_value_heads, c.rms_norm_eps
        self.hd = c.hidden_size // self.nh
        cat = torch.cat
        self.layers = [(cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), a.o_proj.weight,
                        cat([f.gate_proj.weight, f.up_proj.weight]), f.down_proj.weight,
                        layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
                       for layer in m.layers for a, f in [(layer.self_attn, layer.mlp)]]
        self.embed, self.norm, self.lm_head = m.embed_tokens.weight, m.norm.weight, hf.lm_head.weight
        self.inv_freq = m.rotary_emb.inv_freq.float()  # (D/2,) the config's RoPE frequencies
        self.reset(S)

    def reset(self, S: int) -> None:
        """An empty cache of ``S`` slots."""
        self.k = self.embed.new_zeros(len(self.layers), 1, self.nkv, S, self.hd)  # (L, B, Hkv, S, D)
        self.v = torch.zeros_like(self.k)
        self.causal = torch.ones(S, S, dtype=torch.bool, device=self.embed.device).tril()

    def rms(self, x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * w

    def rope(self, x, cos, sin):  # x: (1, H, T, D)
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        T, dt = tokens.shape[0], self.embed.dtype
        x = self.embed[tokens]  # (T, H)
        freqs = pos[:, None].float() * self.inv_freq  # (T, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(dt), emb.sin().to(dt)
        mask = self.causal[pos][None, None]  # (1, 1, T, S)
        nq, nkv = self.nh * self.hd, self.nkv * self.hd
        for i, (wqkv, wo, w13, w2, n1, n2) in enumerate(self.layers):
            q, k, v = F.linear(self.rms(x, n1), wqkv).split([nq, nkv, nkv], dim=-1)
            q = self.rope(q.view(1, T, self.nh, self.hd).transpose(1, 2), cos, sin)
            k = self.rope(k.view(1, T, self.nkv, self.hd).transpose(1, 2), cos, sin)
            self.k[i][:, :, pos] = k
            self.v[i][:, :, pos] = v.view(1, T, self.nkv, self.hd).transpose(1, 2)
            kc, vc, rep = self.k[i], self.v[i], self.nh // self.nkv
            if rep > 1:  # grouped queries: gpt-fast repeats the cached heads
                kc, vc = kc.repeat_interleave(rep, dim=1), vc.repeat_interleave(rep, dim=1)
            o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)  # (1, H, T, D)
            x = x + F.linear(o.transpose(1, 2).reshape(T, nq), wo)
            g, u = F.linear(self.rms(x, n2), w13).chunk(2, dim=-1)
            x = x + F.linear(F.silu(g) * u, w2)
        return F.linear(self.rms(x, self.norm), self.lm_head)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, iters: int) -> float:
    """Milliseconds per call, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t) / iters * 1e3


def wide_tree(n: int, depth: int = 4, topk: int = 10) -> TreeBuffers:
    """``mc_sim_7b_63`` widened to ``n`` nodes with the paths of smallest rank sum (for 128 tokens)."""
    paths = {tuple(p) for p in tree_choices("mc_sim_7b_63")}
    grid = np.stack(np.meshgrid(*[np.arange(topk)] * depth, indexing="ij"), -1).reshape(-1, depth)
    cands = sorted({tuple(r[:d]) for r in grid for d in range(1, depth + 1)}, key=lambda p: (sum(p), len(p), p))
    for p in cands:
        if len(paths) == n - 1:
            break
        if p not in paths and (len(p) == 1 or p[:-1] in paths):
            paths.add(p)
    return build_tree([list(p) for p in paths])


def tree_of(n: int) -> TreeBuffers:
    return {1: ROOT_ONLY, 16: load_tree("cpu-16"), 64: load_tree("mc_sim_7b_63")}.get(n) or wide_tree(n)


def make_model(shape: str, tiny: bool, device: str, dtype: torch.dtype) -> tuple[MedusaModel, MedusaHeads]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(SHAPES[shape])
    if tiny:
        cfg.update(TINY, num_attention_heads=TINY_HEADS[shape][0], num_key_value_heads=TINY_HEADS[shape][1])
    torch.manual_seed(0)
    config = LlamaConfig(**cfg, max_position_embeddings=4096, attn_implementation="sdpa")
    with torch.device(device):
        base = LlamaForCausalLM(config).to(dtype).eval()
    heads = MedusaHeads(MedusaConfig(num_heads=4, hidden_size=config.hidden_size, vocab_size=config.vocab_size))
    return MedusaModel(base), heads.to(device, dtype).eval()


def bench_steps(model: MedusaModel, heads, prompt: np.ndarray, modes, iters: int) -> dict:
    """ms per step, per tree size: our verifiers, and the reference (its forward and argmax to the
    host) over as many slots as our static cache."""
    rows, dev = {}, model.device
    ref = ReferenceLlama(model.base, 1)
    for n in SIZES:
        tree = tree_of(n)
        med = MedusaModel(model.base, heads if n > 1 else None, tree)
        toks = np.random.default_rng(n).integers(0, model.vocab_size, n)
        row = {}
        for mode in modes:
            ctx, caches = med.make_cache()
            ctx.planned = len(prompt) + 64
            prefill(med, ctx, caches, prompt)
            policy = make_policy()
            v = {"dynamic": Verifier, "static": StaticVerifier, "graph": GraphedVerifier}[mode](
                med, ctx, caches, tree, policy)
            seq = Sequence(ctx, policy, tree, toks, root=len(prompt))
            row[mode] = timed(lambda: v.verify(seq), iters)
            slots = getattr(v, "kv", None) and v.kv.size
        ref.reset(slots)
        ref.step(torch.as_tensor(prompt, device=dev), torch.arange(len(prompt), device=dev))
        tt, pos = torch.as_tensor(toks, device=dev), torch.arange(len(prompt), len(prompt) + n, device=dev)
        step = lambda: ref.step(tt, pos).argmax(-1)  # noqa: E731
        row["reference"] = timed(lambda: step().cpu(), iters)
        if "graph" in modes:
            replay = capture(step)
            row["reference-graph"] = timed(lambda: replay().cpu(), iters)
        rows[n] = {k: round(t, 3) for k, t in row.items()}
    return rows


def mode_name(device: torch.device, fast_path: bool) -> str:
    return "dynamic" if not fast_path else "graph" if device.type == "cuda" else "static"


def bench_loops(model: MedusaModel, heads, prompt: np.ndarray, tokens: int) -> dict:
    """Whole ``generate_step`` loops, ms per token and tokens per step, dynamic and fast path;
    ``*-same-tokens``: both gave the same tokens."""
    out = {}
    for name, med in (("plain", model), ("medusa-64", MedusaModel(model.base, heads, load_tree("mc_sim_7b_63")))):
        ids = []
        for fast_path in (False, True):
            # Sized for everything below: 4 untimed steps (prefill, warm-up, capture) emit at most 20 tokens.
            steps = generate_step(prompt, med, fast_path=fast_path, max_tokens=tokens + 32)
            got = [t for _ in range(4) for t in next(steps).tokens]
            warm, n = len(got), 0
            sync()
            t = time.perf_counter()
            while len(got) - warm < tokens:
                got += next(steps).tokens
                n += 1
            sync()
            ms = (time.perf_counter() - t) * 1e3
            out[f"{name}-{mode_name(model.device, fast_path)}"] = {
                "ms_per_token": round(ms / (len(got) - warm), 3), "tokens_per_step": round((len(got) - warm) / n, 3)}
            ids.append(got[:tokens])
        out[f"{name}-same-tokens"] = ids[0] == ids[1]
    return out


def reference_error(model: MedusaModel, prompt: np.ndarray) -> float:
    """Largest |logit| difference from transformers' on the prompt: the reference is a real Llama."""
    dev = model.device
    ref = ReferenceLlama(model.base, len(prompt))
    with torch.inference_mode():
        want = model.base(torch.as_tensor(prompt, device=dev)[None]).logits[0]
    got = ref.step(torch.as_tensor(prompt, device=dev), torch.arange(len(prompt), device=dev))
    return float((got.float() - want.float()).abs().max())


def run_shape(shape: str, args) -> dict:
    cuda = torch.cuda.is_available()
    tiny = args.size == "tiny" or (args.size is None and not cuda)
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda and not tiny else torch.float32  # tiny: a check of the paths, exact
    model, heads = make_model(shape, tiny, dev, dtype)
    prompt = np.random.default_rng(0).integers(0, model.vocab_size, args.cache_len)
    modes = ("dynamic", "static", "graph") if cuda else ("dynamic", "static")
    out = {"shape": shape, "tiny": tiny, "dtype": str(dtype).removeprefix("torch."),
           "reference_max_logit_error": reference_error(model, prompt[:32]),
           "step_ms": bench_steps(model, heads, prompt, modes, args.iters),
           "generate_step": bench_loops(model, heads, prompt, args.tokens)}
    best = "graph" if cuda else "static"
    ref = "reference-graph" if cuda else "reference"
    out["ratio_to_reference"] = {n: round(r[best] / r[ref], 3) for n, r in out["step_ms"].items()}
    return out


def report(out: dict) -> None:
    print(f"== {out['shape']}{' (tiny)' if out['tiny'] else ''}, {out['dtype']}: reference vs transformers, "
          f"max logit error {out['reference_max_logit_error']:.3g}")
    for n, row in out["step_ms"].items():
        print(f"  N={n:4d}  " + "  ".join(f"{k} {v:8.3f} ms" for k, v in row.items())
              + f"  ours/reference {out['ratio_to_reference'][n]:.2f}x")
    for k, v in out["generate_step"].items():
        print(f"  {k:22s} {v}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--size", choices=["full", "tiny"], default=None, help="default: full on CUDA, tiny elsewhere")
    ap.add_argument("--cache-len", type=int, default=512, help="cached tokens before the timed steps")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per timed generate_step loop")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    res = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
           "cache_len": args.cache_len, "shapes": []}
    for shape in args.shapes:
        res["shapes"].append(run_shape(shape, args))
        report(res["shapes"][-1])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(json.dumps(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
