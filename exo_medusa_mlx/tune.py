"""``mlx_medusa tune``: size the tree to the heads and to this machine.

Measures each head's top-k accuracy on held-out data and the cost of a decoding
step with N tree tokens (through the step itself, ``core/step.py``), then grows
the tree with the most expected tokens per second (``core/growth.py``), checks it
against plain decoding on real prompts and saves it beside the heads.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm.auto import tqdm

from .core.accept import make_policy
from .core.growth import (TOPK, conditional_accuracy, empirical_accept_length, gather_fraction, grow_tree,
                          topk_accuracy)
from .core.step import ROOT_ONLY, Verifier, advance, generate_step, prefill
from .core.tree import build_tree, save_tree, tree_choices
from .distill import DATA_DIR, build_cache, cache_key, chat_ids, eos_ids, iterate_batches, read_prompts
from .train import next_embeds, target_ranks

DEFAULT_HELDOUT = DATA_DIR / "heldout_prompts.json"
MAX_LATENCY_NODES = 64


# --------------------------------------------------------------------------- accuracies


def held_out_ranks(heads, lm_head, folder: Path, files: list[str], batch_size: int = 512, embed=None,
                   draft=None) -> np.ndarray:
    """Rank of the base model's choice among each head's logits, (rows, K); -1 past a sequence's end.

    ``embed``: the base model's token embedding, for next-token heads; ``draft``: the
    heads' draft vocabulary and rows (``MedusaModel.draft()``), as decoding scores them."""
    out = [np.array(target_ranks(heads, lm_head, mx.array(b["hidden"], dtype=mx.float32), mx.array(b["targets"]),
                                 next_embeds(heads, embed, b), draft))
           for b in iterate_batches(folder, files, heads.num_heads, batch_size)]
    return np.concatenate(out)


# --------------------------------------------------------------------------- the cost of a step


def probe_trees(max_nodes: int, depth: int, topk: int = TOPK) -> dict[int, object]:
    """A tree of every size up to ``max_nodes`` at most ``depth`` deep: prefixes of the reference's
    sorted 63-path tree (its paths that deep), then the other paths of ranks < ``topk``, shortest first."""
    ref = [tuple(p) for p in tree_choices("mc_sim_7b_63") if len(p) <= depth and max(p) < topk]
    paths = sorted(ref, key=lambda p: (len(p), p))
    level = [()]
    for d in range(1, depth + 1):
        level = [p + (r,) for p in level for r in range(topk)]
        paths += sorted(set(level) - set(paths))
        if len(paths) >= max_nodes:
            break
    return {n: build_tree([list(p) for p in paths[: n - 1]]) for n in range(1, min(max_nodes, len(paths) + 1) + 1)}


def _prefilled(model, context: int, rng):
    ctx, caches = model.make_cache()
    prefill(model, ctx, caches, rng.integers(0, model.vocab_size, context))
    return ctx, caches


def measure_latency(model, sizes, context: int = 128, repeats: int = 5, seed: int = 0) -> tuple[dict[int, float], float]:
    """Median seconds of one decoding step with N tree tokens over a prefilled cache.

    A step is the one every decoder runs (``Verifier.verify``: the forward, the
    base logits and the heads' guesses at every node, the verdict; then
    ``advance``: the acceptance and the next tree) with nothing committed, so
    every step sees ``context`` cached tokens; a commit that must gather nodes out
    of place costs extra (``measure_gather``). A size is timed on its second step
    in a row (decoding repeats one shape; the first step after another size runs
    cold), and sizes go round-robin so load changes on a shared machine hit them
    all alike. Also returns the host's share of a step (the acceptance).
    """
    rng = np.random.default_rng(seed)
    trees = probe_trees(max(sizes), model.heads.num_heads, min(TOPK, model.heads.config.candidates))
    sizes = [n for n in sizes if n in trees]
    ctx, caches = _prefilled(model, context, rng)
    policy = make_policy()
    times = {n: [] for n in sizes}
    host = []

    def step(n):
        tree = trees[n]
        tokens = rng.integers(0, model.vocab_size, n)
        t0 = time.perf_counter()
        v = Verifier(model, ctx, caches, tree, policy).verify(tokens)
        t1 = time.perf_counter()
        advance(policy, tree, tokens, v)
        t2 = time.perf_counter()
        if n > 1:
            host.append(t2 - t1)
        return t2 - t0

    for _ in tqdm(range(repeats), desc="latency", unit="pass"):
        for n in sizes:
            step(n)  # untimed: decoding repeats one shape, so time the second step of it
            times[n].append(step(n))
    curve = {n: float(np.median(t)) for n, t in times.items()}
    # Noise on a shared machine can make a bigger forward look cheaper: keep the curve monotone.
    run = 0.0
    for n in sorted(curve):
        run = curve[n] = max(curve[n], run)
    return curve, float(np.median(host)) if host else 0.0


def measure_gather(model, tree_size: int = 8, context: int = 128, repeats: int = 5, seed: int = 0) -> float:
    """Median extra seconds of a commit that gathers (keeps the root and the last node
    of a ``tree_size`` forward) over one that keeps the root in place."""
    rng = np.random.default_rng(seed)
    tree = probe_trees(tree_size, model.heads.num_heads)[tree_size]
    ctx, caches = _prefilled(model, context, rng)
    cost = {}
    for _ in range(repeats + 1):  # the first round warms up
        for name, nodes in (("in place", [0]), ("gather", [0, tree.size - 1])):
            model.to_numpy(model.forward(ctx, caches, rng.integers(0, model.vocab_size, tree.size), tree))
            t0 = time.perf_counter()
            ctx.commit(caches, np.array(nodes))
            model.settle(caches)
            cost.setdefault(name, []).append(time.perf_counter() - t0)
    return float(np.median(cost["gather"][1:]) - np.median(cost["in place"][1:]))


def measure_plain_step(model, context: int = 128, tokens: int = 16, repeats: int = 3, seed: int = 0) -> float:
    """Seconds per token of plain greedy decoding as ``generate`` runs it (one step ahead), after ``context`` tokens.

    Plain decoding queues the next forward before reading the current token, so
    it runs a little faster than one synchronous step: this, not latency(1), is
    the baseline a tree must beat.
    """
    prompt = np.random.default_rng(seed).integers(0, model.vocab_size, context)
    per_token = []
    for _ in range(repeats):
        steps = generate_step(prompt, model, tree=ROOT_ONLY)
        next(steps)  # the prefill
        next(steps)  # first decode step (pipeline warm-up)
        t0 = time.perf_counter()
        for _ in range(tokens):
            next(steps)
        per_token.append((time.perf_counter() - t0) / tokens)
        steps.close()
    return float(np.median(per_token))


# --------------------------------------------------------------------------- real generation


def compare_generation(model, tokenizer, prompts: list[str], tree, max_tokens: int) -> dict:
    """Greedy generation with the tree and with ``medusa=False`` on each prompt, alternating which goes first."""
    from .core.generation import stream_generate

    def run(ids, medusa):
        toks, last = [], None
        for last in stream_generate(model, tokenizer, ids, max_tokens=max_tokens, medusa=medusa, tree=tree):
            toks.append(last.token)
        secs = (last.generation_tokens - 1) / last.generation_tps if last.generation_tps else 0.0
        return toks, last, secs

    run(chat_ids(tokenizer, prompts[0]), True)  # warm-up
    agg = {m: {"tokens": 0, "seconds": 0.0, "steps": 0} for m in ("medusa", "plain")}
    same = 0
    for k, p in enumerate(tqdm(prompts, desc="generate", unit="prompt")):
        ids = chat_ids(tokenizer, p)
        out = {}
        for medusa in ((True, False) if k % 2 == 0 else (False, True)):
            toks, last, secs = run(ids, medusa)
            m = agg["medusa" if medusa else "plain"]
            m["tokens"] += last.generation_tokens - 1
            m["seconds"] += secs
            m["steps"] += last.steps
            out[medusa] = toks
        same += out[True] == out[False]
    tps = {m: a["tokens"] / max(a["seconds"], 1e-9) for m, a in agg.items()}
    return {
        "medusa_tps": tps["medusa"], "plain_tps": tps["plain"], "speedup": tps["medusa"] / tps["plain"],
        "mean_accepted": agg["medusa"]["tokens"] / max(agg["medusa"]["steps"], 1),
        "identical": same, "prompts": len(prompts),
    }


# --------------------------------------------------------------------------- CLI


@dataclass
class TuneOptions:
    """``mlx_medusa tune``'s options (the flags, kebab-cased)."""

    model: str | None = None
    heads: str | None = None
    prompts: str | None = None
    cache_dir: str | None = None
    data_max_tokens: int = 160
    gen_batch_size: int = 32
    max_nodes: int = 16
    min_nodes: int = 1
    topk: int = TOPK
    context: int = 128
    repeats: int = 5
    output: str | None = None
    num_prompts: int = 8
    max_tokens: int = 128

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TuneOptions":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def check(self) -> None:
        """One-line errors for bad values, before minutes of measuring."""
        if not 1 <= self.max_nodes <= MAX_LATENCY_NODES:
            raise ValueError(f"--max-nodes {self.max_nodes} must be in 1..{MAX_LATENCY_NODES}")
        if not 1 <= self.min_nodes <= self.max_nodes:
            raise ValueError(f"--min-nodes {self.min_nodes} must be in 1..--max-nodes ({self.max_nodes})")
        for name in ("topk", "repeats", "context", "data_max_tokens", "gen_batch_size", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.num_prompts < 0:
            raise ValueError(f"--num-prompts {self.num_prompts} must not be negative (0 skips the generation check)")
        if self.model is not None and self.heads is None:
            raise ValueError("--heads is required with --model")


def setup_arg_parser() -> argparse.ArgumentParser:
    d = TuneOptions()
    p = argparse.ArgumentParser(prog="mlx_medusa tune", allow_abbrev=False, description="Grow the Medusa tree that is fastest on this machine.")
    p.add_argument("--model", default=d.model, help="Base model folder or repo id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--heads", default=d.heads, help="Heads folder (default: the shipped heads of the default model)")
    p.add_argument("--prompts", default=d.prompts, help=f"Held-out prompts (default {DEFAULT_HELDOUT.name})")
    p.add_argument("--cache-dir", default=d.cache_dir, help="Held-out hidden-state shards (default: under the exo_medusa_mlx cache)")
    p.add_argument("--data-max-tokens", type=int, default=d.data_max_tokens, help="Response length of the held-out data")
    p.add_argument("--gen-batch-size", type=int, default=d.gen_batch_size)
    p.add_argument("--max-nodes", type=int, default=d.max_nodes, help="Largest tree, root included")
    p.add_argument("--min-nodes", type=int, default=d.min_nodes,
                   help="Smallest tree (1: plain decoding may win; 2: always at least one guess)")
    p.add_argument("--topk", type=int, default=d.topk)
    p.add_argument("--context", type=int, default=d.context, help="Prefilled tokens under the latency probes")
    p.add_argument("--repeats", type=int, default=d.repeats, help="Latency passes over N = 1..64")
    p.add_argument("--output", "-o", default=d.output, help="Tree JSON to write (default: HEADS/tree.json)")
    p.add_argument("--num-prompts", type=int, default=d.num_prompts, help="Held-out prompts for the real generation check (0: skip)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="Tokens per prompt in the generation check")
    return p


def main(argv=None) -> None:
    opts = TuneOptions.from_args(setup_arg_parser().parse_args(argv))
    try:
        run(opts)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


def heldout_accuracy(model, tokenizer, opts: TuneOptions, prompts: list[str]):
    """(ranks, top-k accuracy, conditional accuracy) of the heads on the held-out answers, printed."""
    from ._blas import cache_root

    key = cache_key(prompts=prompts, max_tokens=opts.data_max_tokens, model=model.model_id, temp=0.0, val_split=0.0,
                    seed=0)
    cache_dir = Path(opts.cache_dir) if opts.cache_dir else cache_root() / "heldout" / key
    meta = build_cache(cache_dir, model.base, model.lm_head, prompts=[chat_ids(tokenizer, p) for p in prompts],
                       eos=eos_ids(tokenizer), key=key, max_tokens=opts.data_max_tokens, batch_size=opts.gen_batch_size)
    ranks = held_out_ranks(model.heads, model.lm_head, cache_dir, [f["file"] for f in meta["splits"]["train"]],
                           embed=model.base.model.embed_tokens, draft=model.draft())
    top, cond = topk_accuracy(ranks, opts.topk), conditional_accuracy(ranks, opts.topk)
    print(f"held-out rows: {len(ranks)}")
    for i in range(model.heads.num_heads):
        print(f"head {i}: top-1..{opts.topk} " + " ".join(f"{a:.2f}" for a in top[i])
              + f" | top-1 given heads <{i} right: {cond[i, 0]:.2f}")
    return ranks, top, cond


def choose_tree(model, opts: TuneOptions, ranks, cond) -> dict:
    """Measure the step's cost on this machine and grow the fastest tree; printed and returned."""
    curve, host = measure_latency(model, list(range(1, MAX_LATENCY_NODES + 1)), opts.context, opts.repeats)
    plain = measure_plain_step(model, opts.context)
    gather = measure_gather(model, context=opts.context)
    # The longest-accepting tree of --max-nodes, whatever it costs (what a fast accelerator
    # could use); the best tree of each size is a prefix of its paths (see grow_tree).
    longest = grow_tree(cond, {k: 1.0 for k in curve}, opts.max_nodes, min_nodes=opts.max_nodes)
    # A tree step as measured (host work included), plus the gathers its commits need;
    # the root alone is plain decoding.
    step = {n: curve[n] + gather * gather_fraction(ranks, longest[: n - 1])
            for n in range(2, opts.max_nodes + 1) if n in curve} | {1: plain}
    choices, info = grow_tree(cond, step, opts.max_nodes, return_info=True, min_nodes=opts.min_nodes)
    if opts.min_nodes > 1 and not grow_tree(cond, step, opts.max_nodes):
        print("note: on this machine no tree beats plain decoding (--no-medusa); "
              f"keeping the best tree of at least {opts.min_nodes} nodes")
    n = len(choices) + 1
    emp, longest_len = empirical_accept_length(ranks, choices), empirical_accept_length(ranks, longest)
    predicted = emp / step[n] * step[1]
    print("latency ms: " + ", ".join(f"N={k}: {curve[k] * 1e3:.1f}" for k in (1, 2, 4, 8, 16, 32, 64) if k in curve)
          + f" (host accept {host * 1e3:.1f} ms of each; a commit that gathers "
          f"adds {gather * 1e3:.1f} ms); plain decoding {plain * 1e3:.1f} ms/token")
    print(f"tree: {n} nodes, depth {max((len(c) for c in choices), default=0)}; expected accepted length "
          f"{emp:.2f} (product model {info['expected_accept_length']:.2f}); predicted speed-up {predicted:.2f}x")
    print(f"longest-accepting tree of {len(longest) + 1} nodes (latency ignored, saved as max_nodes_choices): "
          f"expected accepted length {longest_len:.2f}")
    return {
        "choices": choices, "expected_accept_length": round(emp, 4),
        "expected_accept_length_product": round(info["expected_accept_length"], 4),
        "predicted_speedup": round(predicted, 4), "latency_curve": {k: round(v, 6) for k, v in curve.items()},
        "host_per_step": round(host, 6), "gather_commit": round(gather, 6), "plain_step": round(plain, 6),
        "max_nodes_accept_length": round(longest_len, 4), "max_nodes_choices": longest,
    }


def run(opts: TuneOptions) -> dict:
    from .core.heads_format import SHIPPED_HEADS
    from .loading import load

    opts.check()
    heads_dir = Path(opts.heads) if opts.heads else SHIPPED_HEADS
    folder = heads_dir if heads_dir.is_dir() else heads_dir.parent
    out = Path(opts.output) if opts.output else folder / "tree.json"
    if out.is_dir() or not out.parent.is_dir():
        raise ValueError(f"--output {out}: pass a file path in an existing folder")  # before minutes of measuring
    model, tokenizer = load(opts.model, heads=heads_dir, tree=[[0]])
    prompts = read_prompts(opts.prompts or DEFAULT_HELDOUT)
    ranks, top, cond = heldout_accuracy(model, tokenizer, opts, prompts)
    result = choose_tree(model, opts, ranks, cond)
    choices = result.pop("choices")
    result.update(max_nodes=opts.max_nodes, min_nodes=opts.min_nodes, context=opts.context,
                  heldout_rows=int(len(ranks)),
                  head_topk_accuracy=[[round(float(a), 4) for a in row] for row in top],
                  head_conditional_accuracy=[[round(float(a), 4) for a in row] for row in cond])
    if opts.num_prompts > 0 and choices:
        gen = compare_generation(model, tokenizer, prompts[: opts.num_prompts], choices, opts.max_tokens)
        print(f"generation on {gen['prompts']} held-out prompts: plain {gen['plain_tps']:.1f} tok/s, "
              f"Medusa {gen['medusa_tps']:.1f} tok/s, measured speed-up {gen['speedup']:.2f}x "
              f"(predicted {result['predicted_speedup']:.2f}x); accepted length {gen['mean_accepted']:.2f} "
              f"(expected {result['expected_accept_length']:.2f}); identical outputs {gen['identical']}/{gen['prompts']}")
        result["measured"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in gen.items()}
    save_tree(out, choices, **result)
    print(f"saved tree to {out}")
    return result


if __name__ == "__main__":
    main()
