"""``mlx_medusa tune``: size the tree to the heads and to this machine.

Measures each head's top-k accuracy on held-out data and the latency of one
verification forward of N tokens, then grows the tree that maximises expected
tokens per second, E[accepted + 1] / latency(N). The reference grows by expected
length alone, which on a CPU (where N tokens cost nearly N/2 single steps) picks
trees that are slower than plain decoding.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm.auto import tqdm

from .distill import DATA_DIR, build_cache, cache_key, chat_ids, eos_ids, iterate_batches, read_prompts
from .train import next_embeds, target_ranks
from .core.tree import build_tree, tree_choices

DEFAULT_HELDOUT = DATA_DIR / "heldout_prompts.json"
TOPK = 10  # ranks per head considered (the reference's TOPK)
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


def topk_accuracy(ranks: np.ndarray, topk: int = TOPK) -> np.ndarray:
    """(K, topk): fraction of rows whose target is within head i's top-(k+1)."""
    valid = ranks >= 0
    return np.stack([((ranks >= 0) & (ranks <= k)).sum(0) / np.maximum(valid.sum(0), 1) for k in range(topk)], axis=1)


def conditional_accuracy(ranks: np.ndarray, topk: int = TOPK, min_rows: int = 50) -> np.ndarray:
    """(K, topk): P(head d's target is at rank r | heads 0..d-1 were right at rank 0).

    Heads are correlated (an easy stretch of text is easy for all of them), so
    the chance that a deep node survives is its own accuracy given that its
    ancestors did. The condition is the all-top-1 prefix, which carries most of
    a tree's mass; the product of these along a path approximates the path's
    acceptance. Falls back to the marginal when fewer than ``min_rows`` qualify.
    """
    K = ranks.shape[1]
    acc = np.zeros((K, topk))
    for d in range(K):
        rows = ranks[:, d] >= 0
        cond = rows & (ranks[:, :d] == 0).all(axis=1)
        sel = cond if cond.sum() >= min_rows else rows
        r = ranks[sel, d]
        acc[d] = [(r == k).mean() if len(r) else 0.0 for k in range(topk)]
    return acc


def empirical_accept_length(ranks: np.ndarray, choices) -> float:
    """E[accepted + 1] of a tree on held-out rows, counted exactly (no independence assumed).

    Under greedy acceptance a node is kept iff every rank along its path matches.
    """
    total = 1.0
    for p in choices:
        total += float((ranks[:, : len(p)] == np.asarray(p)).all(axis=1).mean())
    return total


def gather_fraction(ranks: np.ndarray, choices) -> float:
    """Share of held-out rows whose accepted nodes are not already in place (nodes
    0..k-1 of the tree's order), so their commit gathers (see ``measure_gather``)."""
    tree = build_tree(choices)
    node_of = {tuple(p): k + 1 for k, p in enumerate(tree.choices)}
    moved = 0
    for r in ranks:
        nodes, path = [0], ()
        for d in range(tree.depth):
            path = path + (int(r[d]),)
            if path not in node_of:
                break
            nodes.append(node_of[path])
        moved += nodes != list(range(len(nodes)))
    return moved / max(len(ranks), 1)


# --------------------------------------------------------------------------- tree growth


def latency_table(latency, max_nodes: int) -> np.ndarray:
    """Seconds per step for 0..max_nodes tree nodes (index = nodes; [0] unused).

    ``latency``: {nodes: seconds} (interpolated between keys, extended linearly
    past the last one) or a sequence whose element i is the latency of i+1 nodes.
    """
    if isinstance(latency, dict):
        keys = np.array(sorted(int(k) for k in latency), dtype=np.float64)
        vals = np.array([float(latency[k] if k in latency else latency[str(int(k))]) for k in keys.astype(int)])
    else:
        vals = np.asarray(latency, dtype=np.float64).reshape(-1)
        keys = np.arange(1, len(vals) + 1, dtype=np.float64)
    if len(vals) == 0 or (vals <= 0).any():
        raise ValueError("latency must hold positive seconds for at least one tree size")
    n = np.arange(max_nodes + 1, dtype=np.float64)
    out = np.interp(n, keys, vals)
    if len(keys) >= 2:
        slope = (vals[-1] - vals[-2]) / (keys[-1] - keys[-2])
        out = np.where(n > keys[-1], vals[-1] + slope * (n - keys[-1]), out)
    return out


def grow_tree(accuracies, latency, max_nodes: int, return_info: bool = False, min_nodes: int = 1):
    """The tree of at most ``max_nodes`` nodes (root included) with the most expected tokens per second.

    accuracies: (heads, topk), the chance that head d's rank-r guess is right
    given its parent was; a path's acceptance is the product along it.
    latency: seconds per verification step by node count (see ``latency_table``).

    For a given size, the best tree holds the most probable paths, and a child is
    never more probable than its parent, so adding paths best-first gives the best
    tree of every size at once; the size with the highest E[accepted + 1] / latency
    wins (sizes below ``min_nodes`` are not considered). Ties break on the path
    (shorter, then smaller ranks): deterministic. Returns choices (list of paths), and with ``return_info`` also a dict with
    ``expected_accept_length``, ``tokens_per_second`` and ``speedup`` (vs one node).
    """
    acc = np.asarray(accuracies, dtype=np.float64)
    if acc.ndim != 2 or acc.shape[0] == 0 or acc.shape[1] == 0:
        raise ValueError(f"accuracies must be a (heads, topk) array, got shape {acc.shape}")
    if not 1 <= min_nodes <= max_nodes:
        raise ValueError(f"need 1 <= min_nodes ({min_nodes}) <= max_nodes ({max_nodes}); 1 is the root alone")
    depth, topk = acc.shape
    lat = latency_table(latency, max_nodes)
    frontier = [(-acc[0, r], (r,)) for r in range(topk)]
    heapq.heapify(frontier)
    paths, expected = [], 1.0
    best = (1.0 / lat[1] if min_nodes == 1 else -1.0, 0, 1.0)  # (tokens/s, paths kept, expected length)
    while frontier and len(paths) + 1 < max_nodes:
        neg_p, path = heapq.heappop(frontier)
        paths.append(path)
        expected += -neg_p
        rate = expected / lat[len(paths) + 1]
        if len(paths) + 1 >= min_nodes and rate > best[0] * (1 + 1e-9):
            best = (rate, len(paths), expected)
        if len(path) < depth:
            for r in range(topk):
                heapq.heappush(frontier, (neg_p * acc[len(path), r], path + (r,)))
    choices = [list(p) for p in paths[: best[1]]]
    if not return_info:
        return choices
    return choices, {"expected_accept_length": best[2], "tokens_per_second": best[0], "speedup": best[0] * lat[1]}


# --------------------------------------------------------------------------- latency


def _probe_trees(max_nodes: int) -> dict[int, object]:
    """A tree of every size up to 64: prefixes of the reference's sorted 63-path tree."""
    paths = sorted(tree_choices("mc_sim_7b_63"), key=lambda p: (len(p), p))
    return {n: build_tree(paths[: n - 1]) for n in range(1, min(max_nodes, len(paths) + 1) + 1)}


def measure_latency(model, sizes, context: int = 128, repeats: int = 5, seed: int = 0) -> tuple[dict[int, float], float]:
    """Median seconds of one decoding step with N tree tokens over a prefilled cache.

    A step is what ``generate_step`` runs: the forward; with heads, base and head
    logits of every node in one projection (all heads, an upper bound) and each
    head's top-k per node; the argmax; then the acceptance on the
    host. Nothing is committed, so every step sees ``context`` cached tokens; a
    commit that must gather nodes out of place (a path off the tree's first
    children) costs extra, which ``measure_gather`` reports. A size is timed on
    its second step in a row (decoding repeats one shape; the first step after
    another size runs cold). Sizes are measured round-robin so load changes on a
    shared machine hit them all alike. Also returns the host's share of a step
    (the acceptance), which the curve already includes.
    """
    from .core.accept import greedy_accept
    from .core.step import prefill

    rng = np.random.default_rng(seed)
    V = model.vocab_size
    trees = _probe_trees(max(sizes))
    sizes = [n for n in sizes if n in trees]
    ctx, caches = model.make_cache()
    prefill(model, ctx, caches, rng.integers(0, V, context))
    times = {n: [] for n in sizes}
    host = []

    def step(n):
        tree = trees[n]
        tokens = mx.array(rng.integers(0, V, n), dtype=mx.int32)
        t0 = time.perf_counter()
        h = model.forward(ctx, caches, tokens, tree)
        if model.heads is not None and n > 1:
            # Every head: trees of this size may be deeper than the probe (decoding
            # projects only its tree's depth, so this errs a few lm_head rows high).
            logits, guesses = model.propose(h, None, TOPK)
        else:
            logits, guesses = model.logits(h), None
        verdict = mx.argmax(logits, axis=-1)
        mx.eval(verdict, guesses)
        t1 = time.perf_counter()
        greedy_accept(tree, np.array(tokens), np.array(verdict))
        # Nothing committed: the context stays at ``context`` tokens, as under the plain
        # baseline. Keeping the root is in place (a few slots written in the next
        # graph); a commit that gathers costs more (``measure_gather``).
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
    from .core.step import prefill

    rng = np.random.default_rng(seed)
    tree = _probe_trees(tree_size)[tree_size]
    ctx, caches = model.make_cache()
    prefill(model, ctx, caches, rng.integers(0, model.vocab_size, context))
    cost = {}
    for _ in range(repeats + 1):  # the first round warms up
        for name, nodes in (("in place", [0]), ("gather", [0, tree.size - 1])):
            mx.eval(model.forward(ctx, caches, mx.array(rng.integers(0, model.vocab_size, tree.size)), tree))
            t0 = time.perf_counter()
            ctx.commit(caches, np.array(nodes))
            mx.eval([c.state for c in caches])
            cost.setdefault(name, []).append(time.perf_counter() - t0)
    return float(np.median(cost["gather"][1:]) - np.median(cost["in place"][1:]))


def measure_plain_step(model, context: int = 128, tokens: int = 16, repeats: int = 3, seed: int = 0) -> float:
    """Seconds per token of plain greedy decoding as ``generate`` runs it (pipelined), after ``context`` tokens.

    Plain decoding queues the next forward before reading the current token, so
    it runs a little faster than one synchronous forward: this, not latency(1),
    is the baseline a tree must beat.
    """
    from .core.step import generate_step

    prompt = np.random.default_rng(seed).integers(0, model.vocab_size, context)
    per_token = []
    for _ in range(repeats):
        steps = generate_step(prompt, model, medusa=False)
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
    from .generate import stream_generate

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


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx_medusa tune", allow_abbrev=False, description="Grow the Medusa tree that is fastest on this machine.")
    p.add_argument("--model", default=None, help="Base model folder or repo id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--heads", default=None, help="Heads folder (default: the shipped heads of the default model)")
    p.add_argument("--prompts", default=None, help=f"Held-out prompts (default {DEFAULT_HELDOUT.name})")
    p.add_argument("--cache-dir", default=None, help="Held-out hidden-state shards (default: under the exo_medusa_mlx cache)")
    p.add_argument("--data-max-tokens", type=int, default=160, help="Response length of the held-out data")
    p.add_argument("--gen-batch-size", type=int, default=32)
    p.add_argument("--max-nodes", type=int, default=16, help="Largest tree, root included")
    p.add_argument("--min-nodes", type=int, default=1,
                   help="Smallest tree (1: plain decoding may win; 2: always at least one guess)")
    p.add_argument("--topk", type=int, default=TOPK)
    p.add_argument("--context", type=int, default=128, help="Prefilled tokens under the latency probes")
    p.add_argument("--repeats", type=int, default=5, help="Latency passes over N = 1..64")
    p.add_argument("--output", "-o", default=None, help="Tree JSON to write (default: HEADS/tree.json)")
    p.add_argument("--num-prompts", type=int, default=8, help="Held-out prompts for the real generation check (0: skip)")
    p.add_argument("--max-tokens", type=int, default=128, help="Tokens per prompt in the generation check")
    return p


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


def run(args) -> dict:
    from ._blas import cache_root
    from .loading import SHIPPED_HEADS, load

    if args.max_nodes < 1 or args.max_nodes > MAX_LATENCY_NODES:
        raise ValueError(f"--max-nodes {args.max_nodes} must be in 1..{MAX_LATENCY_NODES}")
    if not 1 <= args.min_nodes <= args.max_nodes:
        raise ValueError(f"--min-nodes {args.min_nodes} must be in 1..--max-nodes ({args.max_nodes})")
    for name in ("topk", "repeats", "context", "data_max_tokens", "gen_batch_size", "max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.num_prompts < 0:
        raise ValueError(f"--num-prompts {args.num_prompts} must not be negative (0 skips the generation check)")
    heads_dir = Path(args.heads) if args.heads else (SHIPPED_HEADS if args.model is None else None)
    if heads_dir is None:
        raise ValueError("--heads is required with --model")
    model, tokenizer = load(args.model, heads=heads_dir, tree=[[0]])
    folder = heads_dir if heads_dir.is_dir() else heads_dir.parent
    out = Path(args.output) if args.output else folder / "tree.json"
    if out.is_dir() or not out.parent.is_dir():
        raise ValueError(f"--output {out}: pass a file path in an existing folder")  # before minutes of measuring
    prompts = read_prompts(args.prompts or DEFAULT_HELDOUT)

    key = cache_key(prompts=prompts, max_tokens=args.data_max_tokens, model=model.model_id, temp=0.0, val_split=0.0, seed=0)
    cache_dir = Path(args.cache_dir) if args.cache_dir else cache_root() / "heldout" / key
    meta = build_cache(cache_dir, model.base, model.lm_head, prompts=[chat_ids(tokenizer, p) for p in prompts],
                       eos=eos_ids(tokenizer), key=key, max_tokens=args.data_max_tokens, batch_size=args.gen_batch_size)
    ranks = held_out_ranks(model.heads, model.lm_head, cache_dir, [f["file"] for f in meta["splits"]["train"]],
                           embed=model.base.model.embed_tokens, draft=model.draft())
    top = topk_accuracy(ranks, args.topk)
    cond = conditional_accuracy(ranks, args.topk)
    print(f"held-out rows: {len(ranks)}")
    for i in range(model.heads.num_heads):
        print(f"head {i}: top-1..{args.topk} " + " ".join(f"{a:.2f}" for a in top[i])
              + f" | top-1 given heads <{i} right: {cond[i, 0]:.2f}")

    sizes = list(range(1, MAX_LATENCY_NODES + 1))
    curve, host = measure_latency(model, sizes, args.context, args.repeats)
    plain = measure_plain_step(model, args.context)
    gather = measure_gather(model, context=args.context)
    # The longest-accepting tree of --max-nodes, whatever it costs (what a fast accelerator
    # could use); the best tree of each size is a prefix of its paths (see grow_tree).
    longest = grow_tree(cond, {k: 1.0 for k in curve}, args.max_nodes, min_nodes=args.max_nodes)
    # A tree step as measured (host work included), plus the gathers its commits need;
    # the root alone is plain decoding.
    step = {n: curve[n] + gather * gather_fraction(ranks, longest[: n - 1])
            for n in range(2, args.max_nodes + 1)} | {1: plain}
    choices, info = grow_tree(cond, step, args.max_nodes, return_info=True, min_nodes=args.min_nodes)
    if args.min_nodes > 1:
        alone = grow_tree(cond, step, args.max_nodes)
        if not alone:
            print("note: on this machine no tree beats plain decoding (--no-medusa); "
                  f"keeping the best tree of at least {args.min_nodes} nodes")
    longest_len = empirical_accept_length(ranks, longest)
    n = len(choices) + 1
    emp = empirical_accept_length(ranks, choices)
    predicted = emp / step[n] * step[1]
    print(f"latency ms: " + ", ".join(f"N={k}: {curve[k] * 1e3:.1f}" for k in (1, 2, 4, 8, 16, 32, 64) if k in curve)
          + f" (host accept {host * 1e3:.1f} ms of each; a commit that gathers "
          f"adds {gather * 1e3:.1f} ms); plain decoding {plain * 1e3:.1f} ms/token")
    print(f"tree: {n} nodes, depth {max((len(c) for c in choices), default=0)}; expected accepted length "
          f"{emp:.2f} (product model {info['expected_accept_length']:.2f}); predicted speed-up {predicted:.2f}x")
    print(f"longest-accepting tree of {len(longest) + 1} nodes (latency ignored, saved as max_nodes_choices): "
          f"expected accepted length {longest_len:.2f}")
    result = {
        "expected_accept_length": round(emp, 4), "expected_accept_length_product": round(info["expected_accept_length"], 4),
        "predicted_speedup": round(predicted, 4), "latency_curve": {k: round(v, 6) for k, v in curve.items()},
        "host_per_step": round(host, 6), "gather_commit": round(gather, 6), "plain_step": round(plain, 6), "max_nodes": args.max_nodes,
        "head_topk_accuracy": [[round(float(a), 4) for a in row] for row in top],
        "head_conditional_accuracy": [[round(float(a), 4) for a in row] for row in cond],
        "heldout_rows": int(len(ranks)), "context": args.context, "min_nodes": args.min_nodes,
        "max_nodes_accept_length": round(longest_len, 4), "max_nodes_choices": longest,
    }
    if args.num_prompts > 0 and choices:
        gen = compare_generation(model, tokenizer, prompts[: args.num_prompts], choices, args.max_tokens)
        print(f"generation on {gen['prompts']} held-out prompts: plain {gen['plain_tps']:.1f} tok/s, "
              f"Medusa {gen['medusa_tps']:.1f} tok/s, measured speed-up {gen['speedup']:.2f}x "
              f"(predicted {predicted:.2f}x); accepted length {gen['mean_accepted']:.2f} (expected {emp:.2f}); "
              f"identical outputs {gen['identical']}/{gen['prompts']}")
        result["measured"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in gen.items()}
    from .core.tree import save_tree

    save_tree(out, choices, **result)
    print(f"saved tree to {out}")
    return result


if __name__ == "__main__":
    main()
