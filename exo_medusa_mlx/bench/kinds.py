"""``mlx_medusa bench --suite kinds``: Medusa on the prompts users bring, per task kind.

On the held-out prompts of each kind (data/heldout_kinds.json: chat with earlier turns,
translation, summaries, extractive QA, math, code, RAG, long prompts), greedy, in one run:
plain decoding (mlx-lm's stream_generate) and Medusa with each tree of ``--trees`` (a preset,
a JSON file, ``dynamic[:N]``, ``best:N`` (the heads' best static tree of N nodes) or ``default``:
the heads' tuned tree), back to back per prompt, the order rotating. Per kind and tree: plain and Medusa
tokens/s, the speed-up, mean accepted tokens per step, tree nodes per step, and whether
Medusa's tokens are identical to plain decoding's. ``--accuracy`` adds the heads' held-out
top-1 per head per kind (tune's measure, on the base model's own answers).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli_args import fail, positive_int
from ..core.tokens import prompt_ids
from ..training.kinds import KINDS, parse_kinds
from ..training.prompts import HELDOUT_KINDS, read_kind_prompts
from .measure import machine, run_mlx_lm, run_ours, save_figure, tree_facts, write_results

PLAIN = "plain"
DEFAULT_TREE = "default"  # the heads' tuned tree (what load picks)


def run_kinds(model=None, heads=None, trees=(DEFAULT_TREE,), kinds=KINDS, limit_per_kind=None, max_tokens=128,
              prompts=HELDOUT_KINDS, accuracy=False, log=print) -> dict:
    """Plain decoding and Medusa with each tree on every held-out prompt of ``kinds``; the result
    (per prompt, per kind, over all kinds), as written to kinds.json."""
    from tqdm import tqdm

    from ..core.generation import stream_generate
    from ..loading import load

    held = read_kind_prompts(prompts)
    missing = [k for k in kinds if k not in held]
    if missing:
        raise ValueError(f"--prompts {prompts} has no prompts of kind {', '.join(missing)}: pass --kinds")
    med, tokenizer = load(model, heads=heads)
    if med.heads is None:
        raise ValueError("bench needs Medusa heads: pass --heads (the default model's shipped heads are used when present)")
    models = {t: med if t == DEFAULT_TREE else med.with_tree(t) for t in trees}  # a bad tree fails before timing
    def medusa(m):
        return lambda ids: run_ours(m, tokenizer, ids, max_tokens, True, stream_generate)

    runners = {PLAIN: lambda ids: run_mlx_lm(med.base, tokenizer, ids, max_tokens)}
    runners.update({t: medusa(models[t]) for t in trees})
    order = [PLAIN, *trees]
    for m in order:  # warm-up, not timed
        runners[m](prompt_ids(tokenizer, "Hi"))
    todo = [(k, p) for k in kinds for p in held[k][:limit_per_kind]]
    rows = []
    for i, (kind, prompt) in enumerate(tqdm(todo, desc="bench kinds", unit="prompt")):
        ids = prompt_ids(tokenizer, prompt)
        runs = {m: runners[m](ids) for m in order[i % len(order):] + order[: i % len(order)]}
        for t in trees:
            runs[t]["same_tokens"] = runs[t]["tokens"] == runs[PLAIN]["tokens"]
        rows.append({"kind": kind, "prompt_tokens": len(ids), "runs": runs})
    result = {"machine": machine(), "model": str(model or "default"), "heads": str(heads or "shipped"),
              "max_tokens": max_tokens, "trees": {t: tree_facts(models[t]) for t in trees},
              "kinds": list(kinds), "prompts": rows, "summary": summarize(rows, trees)}
    if accuracy:
        result["accuracy"] = kind_accuracy(med, tokenizer, {k: held[k][:limit_per_kind] for k in kinds}, max_tokens)
    return result


def _totals(runs: list[dict]) -> dict:
    toks = sum(len(r["tokens"]) for r in runs)
    secs = sum(len(r["tokens"]) / r["generation_tps"] for r in runs if r["generation_tps"])
    steps = sum(r.get("steps") or 0 for r in runs)
    return {"tokens": toks, "tps": toks / secs if secs else 0.0,
            # per step, weighted by the steps taken (mean_accepted is each run's tokens per step)
            "mean_accepted": sum((r.get("mean_accepted") or 0) * (r.get("steps") or 0) for r in runs) / steps
            if steps else None,
            "mean_tree_size": sum((r.get("mean_tree_size") or 0) * (r.get("steps") or 0) for r in runs) / steps
            if steps and all(r.get("mean_tree_size") for r in runs) else None}


def summarize(rows: list[dict], trees) -> dict:
    """Per kind (and ``all``), per tree: plain and Medusa tokens/s, speed-up, accepted, identical."""
    out = {}
    for kind in [*dict.fromkeys(r["kind"] for r in rows), "all"]:
        mine = [r for r in rows if kind in ("all", r["kind"])]
        plain = _totals([r["runs"][PLAIN] for r in mine])
        out[kind] = {"prompts": len(mine), "plain_tps": plain["tps"], "trees": {}}
        for t in trees:
            med = _totals([r["runs"][t] for r in mine])
            same = sum(r["runs"][t]["same_tokens"] for r in mine)
            out[kind]["trees"][t] = {"medusa_tps": med["tps"], "speedup": med["tps"] / plain["tps"] if plain["tps"] else None,
                                     "mean_accepted": med["mean_accepted"], "mean_tree_size": med["mean_tree_size"],
                                     "identical": same == len(mine), "identical_prompts": same}
    return out


def kind_accuracy(model, tokenizer, prompts: dict[str, list], max_tokens: int) -> dict:
    """{kind: {"rows", "top1": per head}}: the heads' held-out top-1 on the base model's own
    greedy answers to each kind's prompts (tune's measure; its cache is reused)."""
    from ..core.growth import topk_accuracy
    from ..tune import TuneOptions, heldout_accuracy

    opts = TuneOptions(data_max_tokens=max_tokens)
    out = {}
    for kind, ps in prompts.items():
        ranks, _ = heldout_accuracy(model, tokenizer, opts, ps)  # (rows, K); the log-probabilities are unused
        out[kind] = {"rows": int(len(ranks)), "top1": [round(float(a), 4) for a in topk_accuracy(ranks, 1)[:, 0]]}
    return out


def _f(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def markdown(result: dict) -> str:
    lines = ["| kind | prompts | plain tok/s | tree | Medusa tok/s | speed-up | mean accepted | nodes/step | identical |",
             "|---|---|---|---|---|---|---|---|---|"]
    for kind, s in result["summary"].items():
        for t, m in s["trees"].items():
            nodes = m["mean_tree_size"] or result["trees"][t]["size"]
            same = "yes" if m["identical"] else f"NO ({m['identical_prompts']}/{s['prompts']})"
            lines.append(f"| {kind} | {s['prompts']} | {s['plain_tps']:.1f} | {t} | {m['medusa_tps']:.1f} | "
                         f"{_f(m['speedup'], '.2f')}x | {_f(m['mean_accepted'], '.2f')} | {nodes:.2f} | {same} |")
    acc = result.get("accuracy")
    if acc:
        heads = len(next(iter(acc.values()))["top1"])
        lines += ["", "Heads' held-out top-1 per kind (on the base model's greedy answers):", "",
                  "| kind | rows | " + " | ".join(f"head {i}" for i in range(heads)) + " |",
                  "|---|---|" + "---|" * heads]
        lines += [f"| {k} | {a['rows']} | " + " | ".join(f"{x:.3f}" for x in a["top1"]) + " |" for k, a in acc.items()]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Grouped bars per kind, one per tree: speed-up over plain decoding and mean accepted tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kinds = list(result["summary"])
    trees = list(result["trees"])
    x, width = np.arange(len(kinds)), 0.8 / len(trees)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.4 * len(kinds)) * 2, 4))
    for ax, key, label in ((axes[0], "speedup", "speed-up over plain decoding"),
                           (axes[1], "mean_accepted", "mean accepted tokens per step")):
        for j, t in enumerate(trees):
            vals = [result["summary"][k]["trees"][t][key] or 0 for k in kinds]
            ax.bar(x + (j - (len(trees) - 1) / 2) * width, vals, width, label=t)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(x, kinds, rotation=30)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    axes[0].set_title("Medusa per task kind, greedy, one run")
    fig.tight_layout()
    save_figure(fig, path)


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx_medusa bench --suite kinds", allow_abbrev=False,
                                description="Medusa vs plain decoding per task kind, on held-out prompts, one run.")
    p.add_argument("--model", default=None)
    p.add_argument("--heads", default=None)
    p.add_argument("--trees", default=DEFAULT_TREE,
                   help="Comma list of trees measured against the same plain run: presets, JSON files, "
                        f"dynamic[:N], best:N (the heads' best static tree of N nodes), "
                        f"'{DEFAULT_TREE}' (the heads' tuned tree)")
    p.add_argument("--kinds", default="all", help=f"all, or a comma list of {', '.join(KINDS)}")
    p.add_argument("--limit-per-kind", type=positive_int, default=None, help="Only the first N prompts of each kind")
    p.add_argument("--max-tokens", type=positive_int, default=128)
    p.add_argument("--accuracy", action="store_true", help="Also the heads' held-out top-1 per head per kind")
    p.add_argument("--prompts", default=str(HELDOUT_KINDS), help="Per-kind prompts (JSON: {\"kinds\": {kind: [...]}})")
    p.add_argument("--out", default="runs/bench_kinds", help="Folder for kinds.json, kinds.md, kinds.png")
    return p


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    trees = [t.strip() for t in args.trees.split(",") if t.strip()]
    out = Path(args.out)
    try:
        if not trees or len(set(trees)) < len(trees):
            raise ValueError(f"--trees '{args.trees}': name each tree once, comma-separated")
        out.mkdir(parents=True, exist_ok=True)
        res = run_kinds(args.model, args.heads, trees, parse_kinds(args.kinds), args.limit_per_kind,
                        args.max_tokens, args.prompts, args.accuracy)
    except (ValueError, OSError) as e:
        fail(e)
    md = markdown(res)
    print(md)
    write_results(out, "kinds", res, md, plot)
