"""``mlx_medusa tune``: size the tree to the heads and to this machine, on either backend.

Measures each head's top-k accuracy on held-out data (MLX; the ranks are saved
beside the heads, where a torch tune reads them), the cost of a decoding step with N
tree tokens through the step itself with the transposed product on and off
(``core/latency.py``), grows the tree with the most expected tokens per second
(``core/growth.py``), checks it against plain decoding on real prompts and saves it
beside the heads with the machine it was tuned on (``tree.json``, or
``tree.<backend>.json``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import backends
from .core.growth import (TOPK, conditional_accuracy, empirical_accept_length, gather_fraction, grow_tree,
                          topk_accuracy)
from .core.budget import DEFAULT_BATCH_SIZES
from .core.latency import (MAX_LATENCY_NODES, measure_batch_latency, measure_gather, measure_latency,
                           measure_plain_step)
from .cli_args import NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE_INT, check_fields, int_range, positive_ints
from .core.machine import this_machine
from .core.dynamic import checked_spec, fit_calibration
from .core.tree import save_tree

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_HELDOUT = DATA_DIR / "heldout_prompts.json"
RANKS_FILE = "heldout_ranks.npy"  # beside the heads: what a torch (or later) tune reads
LOGPROBS_FILE = "heldout_logprobs.npy"  # the heads' top-k log-probabilities on the same rows (calibration)


# --------------------------------------------------------------------------- accuracies


def held_out_ranks(heads, lm_head, folder: Path, files: list[str], batch_size: int = 512, embed=None,
                   draft=None, topk: int = TOPK) -> tuple[np.ndarray, np.ndarray]:
    """Rank of the base model's choice among each head's logits, (rows, K), -1 past a sequence's end;
    and each head's log-probabilities of its top-``topk`` guesses, (rows, K, topk).

    ``embed``: the base model's token embedding, for next-token heads; ``draft``: the
    heads' draft vocabulary and rows (``MedusaModel.draft()``), as decoding scores them."""
    import mlx.core as mx

    from .training.hidden_files import iterate_batches
    from .training.loss import path_embeds, ranks_and_logprobs

    k = min(topk, heads.config.candidates)
    out = []
    for b in iterate_batches(folder, files, heads.num_heads, batch_size):
        h, targets = mx.array(b["hidden"], dtype=mx.float32), mx.array(b["targets"])
        out.append(tuple(np.array(a) for a in ranks_and_logprobs(heads, lm_head, h, targets,
                                                                 path_embeds(heads, embed, b), draft, k)))
    return np.concatenate([r for r, _ in out]), np.concatenate([lp for _, lp in out])


# --------------------------------------------------------------------------- real generation


def compare_generation(model, tokenizer, prompts: list[str], tree, max_tokens: int) -> dict:
    """Greedy generation with the tree and with ``medusa=False`` on each prompt, alternating which goes first."""
    from .core.generation import stream_generate
    from .core.tokens import prompt_ids

    def run(ids, medusa):
        toks, last = [], None
        for last in stream_generate(model, tokenizer, ids, max_tokens=max_tokens, medusa=medusa, tree=tree):
            toks.append(last.token)
        secs = (last.generation_tokens - 1) / last.generation_tps if last.generation_tps else 0.0
        return toks, last, secs

    run(prompt_ids(tokenizer, prompts[0]), True)  # warm-up
    agg = {m: {"tokens": 0, "seconds": 0.0, "steps": 0, "nodes": 0.0} for m in ("medusa", "plain")}
    same = 0
    for k, p in enumerate(tqdm(prompts, desc="generate", unit="prompt")):
        ids = prompt_ids(tokenizer, p)
        out = {}
        for medusa in ((True, False) if k % 2 == 0 else (False, True)):
            toks, last, secs = run(ids, medusa)
            m = agg["medusa" if medusa else "plain"]
            m["tokens"] += last.generation_tokens - 1
            m["seconds"] += secs
            m["steps"] += last.steps
            m["nodes"] += last.steps * last.mean_tree_size
            out[medusa] = toks
        same += out[True] == out[False]
    tps = {m: a["tokens"] / max(a["seconds"], 1e-9) for m, a in agg.items()}
    return {
        "medusa_tps": tps["medusa"], "plain_tps": tps["plain"], "speedup": tps["medusa"] / tps["plain"],
        "mean_accepted": agg["medusa"]["tokens"] / max(agg["medusa"]["steps"], 1),
        "mean_tree_size": agg["medusa"]["nodes"] / max(agg["medusa"]["steps"], 1),
        "identical": same, "prompts": len(prompts),
    }


# --------------------------------------------------------------------------- CLI


# Each number flag's rule: its parser type and ``TuneOptions.check``'s check.
RULES = dict(
    data_max_tokens=POSITIVE_INT, gen_batch_size=POSITIVE_INT, max_nodes=int_range(1, MAX_LATENCY_NODES),
    min_nodes=POSITIVE_INT, topk=POSITIVE_INT, context=POSITIVE_INT, repeats=POSITIVE_INT,
    num_prompts=NON_NEGATIVE_INT, max_tokens=POSITIVE_INT, pass_overhead_ms=NON_NEGATIVE,
)


@dataclass
class TuneOptions:
    """``mlx_medusa tune``'s options (the flags, kebab-cased)."""

    model: str | None = None
    heads: str | None = None
    backend: str = "auto"
    device: str | None = None
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
    pass_overhead_ms: float = 0.0
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES  # () skips the batch table
    tree: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TuneOptions":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def check(self) -> None:
        """One-line errors for bad values, before minutes of measuring (the numbers by ``RULES``, as the parser)."""
        check_fields(self, RULES)
        if not self.min_nodes <= self.max_nodes:
            raise ValueError(f"--min-nodes {self.min_nodes} must be in 1..--max-nodes ({self.max_nodes})")
        if self.model is not None and self.heads is None:
            raise ValueError("--heads is required with --model")
        if self.tree is not None:
            checked_spec(self.tree)
        if any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ValueError(f"--batch-sizes {self.batch_sizes}: give whole numbers >= 1, such as 1,2,4,8,16")


def _batch_sizes(text: str) -> tuple[int, ...]:
    return () if text.strip() == "none" else positive_ints(text)


def setup_arg_parser() -> argparse.ArgumentParser:
    d = TuneOptions()
    p = argparse.ArgumentParser(prog="mlx_medusa tune", allow_abbrev=False, description="Grow the Medusa tree that is fastest on this machine.")
    p.add_argument("--model", default=d.model, help="Base model folder or repo id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--heads", default=d.heads, help="Heads folder (default: the shipped heads of the default model)")
    p.add_argument("--backend", choices=["auto", *backends.BACKENDS], default=d.backend,
                   help="whose step to time (auto: MLX where installed); torch reads the held-out ranks an MLX tune saved")
    p.add_argument("--device", default=d.device, help="torch only: device (default cuda when available, else cpu)")
    p.add_argument("--prompts", default=d.prompts, help=f"Held-out prompts (default {DEFAULT_HELDOUT.name})")
    p.add_argument("--cache-dir", default=d.cache_dir, help="Held-out hidden-state files (default: under the exo_medusa_mlx cache)")
    p.add_argument("--data-max-tokens", type=RULES["data_max_tokens"].parse, default=d.data_max_tokens, help="Response length of the held-out data")
    p.add_argument("--gen-batch-size", type=RULES["gen_batch_size"].parse, default=d.gen_batch_size)
    p.add_argument("--max-nodes", type=RULES["max_nodes"].parse, default=d.max_nodes, help="Largest tree, root included")
    p.add_argument("--min-nodes", type=RULES["min_nodes"].parse, default=d.min_nodes,
                   help="Smallest tree (1: plain decoding may win; 2: always at least one guess)")
    p.add_argument("--topk", type=RULES["topk"].parse, default=d.topk)
    p.add_argument("--context", type=RULES["context"].parse, default=d.context, help="Prefilled tokens under the latency probes")
    p.add_argument("--repeats", type=RULES["repeats"].parse, default=d.repeats, help="Latency passes over N = 1..64")
    p.add_argument("--output", "-o", default=d.output,
                   help="Tree JSON to write (default: HEADS/tree.json, or HEADS/tree.<backend>.json but for MLX)")
    p.add_argument("--num-prompts", type=RULES["num_prompts"].parse, default=d.num_prompts, help="Held-out prompts for the real generation check (0: skip)")
    p.add_argument("--max-tokens", type=RULES["max_tokens"].parse, default=d.max_tokens, help="Tokens per prompt in the generation check")
    p.add_argument("--pass-overhead-ms", type=RULES["pass_overhead_ms"].parse, default=d.pass_overhead_ms,
                   help="A fixed cost every step pays on top of its compute: a ring's transport per pass "
                        "(scripts/bench_ring.py prints it); the tree is then saved as tree.ring.json")
    p.add_argument("--batch-sizes", type=_batch_sizes,
                   default=d.batch_sizes,
                   help="Batch sizes at which to time the batched step, saved as the tree file's batch_latency "
                        "(the server shrinks trees as its batch fills by it); 'none' skips (default 1,2,4,8,16)")
    p.add_argument("--tree", default=d.tree,
                   help="Also check this tree against plain decoding on the held-out prompts, e.g. dynamic[:N] "
                        "(fitted to the costs and calibration this tune measured), a preset or a JSON file")
    return p


def main(argv=None) -> None:
    opts = TuneOptions.from_args(setup_arg_parser().parse_args(argv))
    try:
        run(opts)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


def heldout_accuracy(model, tokenizer, opts: TuneOptions, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The heads' ranks on the held-out answers, (rows, K), and their top-k log-probabilities
    (rows, K, topk), computed on MLX (self-distilled data)."""
    from .core.machine import cache_root
    from .core.tokens import eos_ids, prompt_ids
    from .training.state_cache import build_cache, cache_key

    key = cache_key(prompts=prompts, max_tokens=opts.data_max_tokens, model=model.model_id, temp=0.0, val_split=0.0,
                    seed=0)
    cache_dir = Path(opts.cache_dir) if opts.cache_dir else cache_root() / "heldout" / key
    meta = build_cache(cache_dir, model.base, model.lm_head, prompts=[prompt_ids(tokenizer, p) for p in prompts],
                       eos=eos_ids(tokenizer), key=key, max_tokens=opts.data_max_tokens, batch_size=opts.gen_batch_size)
    return held_out_ranks(model.heads, model.lm_head, cache_dir, [f["file"] for f in meta["splits"]["train"]],
                          embed=model.base.model.embed_tokens, draft=model.draft(), topk=opts.topk)


def recorded_ranks(folder: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The held-out ranks (and log-probabilities, if saved) an MLX tune saved beside the heads (for a
    tune on another backend)."""
    path = folder / RANKS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run 'mlx_medusa tune --backend mlx' once for these heads "
                                "(it measures the heads' accuracy and saves their held-out ranks there)")
    logp = folder / LOGPROBS_FILE
    return np.load(path), np.load(logp).astype(np.float32) if logp.is_file() else None


def print_accuracy(ranks: np.ndarray, topk: int):
    """(top-k accuracy, conditional accuracy) of each head, printed."""
    top, cond = topk_accuracy(ranks, topk), conditional_accuracy(ranks, topk)
    print(f"held-out rows: {len(ranks)}")
    for i in range(ranks.shape[1]):
        print(f"head {i}: top-1..{topk} " + " ".join(f"{a:.2f}" for a in top[i])
              + f" | top-1 given heads <{i} right: {cond[i, 0]:.2f}")
    return top, cond


def step_costs(model, opts: TuneOptions, ranks, longest) -> dict:
    """Seconds per step by tree size on this machine (the root alone: plain decoding), with the
    gathers each size's commits need, for the transposed product on and off; and the extras."""
    plain = measure_plain_step(model, opts.context)
    gather = measure_gather(model, context=opts.context)
    out = {"plain": plain, "gather": gather}
    for rows in (True, False):
        curve, host = measure_latency(replace(model, rows_product=rows), list(range(1, MAX_LATENCY_NODES + 1)),
                                      opts.context, opts.repeats)
        step = {n: curve[n] + gather * gather_fraction(ranks, longest[: n - 1])
                for n in range(2, opts.max_nodes + 1) if n in curve} | {1: plain}
        step = {n: t + opts.pass_overhead_ms / 1e3 for n, t in step.items()}  # a ring pass's transport
        out[rows] = {"curve": curve, "host": host, "step": step}
    return out


def choose_tree(model, opts: TuneOptions, ranks, cond) -> dict:
    """Measure the step's cost on this machine and grow the fastest tree and product layout; printed, returned."""
    # The longest-accepting tree of --max-nodes, whatever it costs (what a fast accelerator
    # could use); the best tree of each size is a prefix of its paths (see grow_tree).
    longest = grow_tree(cond, {k: 1.0 for k in range(1, opts.max_nodes + 1)}, opts.max_nodes, min_nodes=opts.max_nodes)
    costs = step_costs(model, opts, ranks, longest)
    picks = {rows: grow_tree(cond, costs[rows]["step"], opts.max_nodes, return_info=True, min_nodes=opts.min_nodes)
             for rows in (True, False)}
    rows = max(picks, key=lambda r: picks[r][1]["tokens_per_second"])
    choices, info = picks[rows]
    step, curve = costs[rows]["step"], costs[rows]["curve"]
    if opts.min_nodes > 1 and not grow_tree(cond, step, opts.max_nodes):
        print("note: on this machine no tree beats plain decoding (--no-medusa); "
              f"keeping the best tree of at least {opts.min_nodes} nodes")
    n = len(choices) + 1
    emp, longest_len = empirical_accept_length(ranks, choices), empirical_accept_length(ranks, longest)
    predicted = emp / step[n] * step[1]
    print("latency ms: " + ", ".join(f"N={k}: {curve[k] * 1e3:.1f}" for k in (1, 2, 4, 8, 16, 32, 64) if k in curve)
          + f" (host accept {costs[rows]['host'] * 1e3:.1f} ms of each; a commit that gathers adds "
          f"{costs['gather'] * 1e3:.1f} ms); plain decoding {costs['plain'] * 1e3:.1f} ms/token; transposed product "
          f"{'on' if rows else 'off'} (off: {picks[False][1]['speedup']:.2f}x, on: {picks[True][1]['speedup']:.2f}x "
          "predicted by the product model)")
    print(f"tree: {n} nodes, depth {max((len(c) for c in choices), default=0)}; expected accepted length "
          f"{emp:.2f} (product model {info['expected_accept_length']:.2f}); predicted speed-up {predicted:.2f}x")
    print(f"longest-accepting tree of {len(longest) + 1} nodes (latency ignored, saved as max_nodes_choices): "
          f"expected accepted length {longest_len:.2f}")
    return {
        "choices": choices, "rows_product": rows, "machine": this_machine(model.device),
        "expected_accept_length": round(emp, 4),
        "expected_accept_length_product": round(info["expected_accept_length"], 4),
        "predicted_speedup": round(predicted, 4), "latency_curve": {k: round(v, 6) for k, v in curve.items()},
        "host_per_step": round(costs[rows]["host"], 6), "gather_commit": round(costs["gather"], 6),
        "plain_step": round(costs["plain"], 6), "max_nodes_accept_length": round(longest_len, 4),
        "max_nodes_choices": longest,
    }


BATCH_TREE_SIZES = (1, 2, 3, 4, 6, 8, 12, 16)  # tree sizes of the batch table (and the tuned tree's)


def batch_costs(model, opts: TuneOptions, tree_size: int) -> dict:
    """Seconds of a batched step by batch size and tree size (``measure_batch_latency``), printed and
    returned for the tree file (JSON keys are strings)."""
    sizes = sorted({n for n in BATCH_TREE_SIZES if n <= opts.max_nodes} | {1, tree_size})
    table = measure_batch_latency(model, opts.batch_sizes, sizes, opts.context, max(1, opts.repeats // 2))
    for B, curve in table.items():
        print(f"batch {B}: step ms " + ", ".join(f"N={n}: {t * 1e3:.1f}" for n, t in curve.items()))
    return {str(B): {str(n): round(t, 6) for n, t in curve.items()} for B, curve in table.items()}


def check_generation(model, tokenizer, prompts: list[str], choices, opts: TuneOptions, result: dict) -> None:
    """The grown tree (and ``--tree``, e.g. ``dynamic``, fitted to what this tune measured) against plain
    decoding on real prompts; printed, and recorded in ``result``."""
    trees = {"measured": choices} if choices else {}
    if opts.tree is not None:
        trees["measured_tree"] = opts.tree
    for key, tree in trees.items():
        gen = compare_generation(model, tokenizer, prompts, tree, opts.max_tokens)
        name = "the grown tree" if key == "measured" else f"--tree {tree}"
        print(f"generation with {name} on {gen['prompts']} held-out prompts: plain {gen['plain_tps']:.1f} tok/s, "
              f"Medusa {gen['medusa_tps']:.1f} tok/s, measured speed-up {gen['speedup']:.2f}x "
              f"(predicted {result['predicted_speedup']:.2f}x for the grown tree); accepted length "
              f"{gen['mean_accepted']:.2f} (grown tree expected {result['expected_accept_length']:.2f}), "
              f"{gen['mean_tree_size']:.2f} nodes per step; identical outputs {gen['identical']}/{gen['prompts']}")
        result[key] = {k: round(v, 4) if isinstance(v, float) else v for k, v in gen.items()}


def run(opts: TuneOptions) -> dict:
    from .core.heads_format import SHIPPED_HEADS
    from .training.prompts import read_prompts

    opts.check()
    backend = backends.resolve_backend(opts.backend)
    heads_dir = Path(opts.heads) if opts.heads else SHIPPED_HEADS
    folder = heads_dir if heads_dir.is_dir() else heads_dir.parent
    name = "tree" + (".ring" if opts.pass_overhead_ms else "") + ("" if backend == "mlx" else f".{backend}")
    out = Path(opts.output) if opts.output else folder / f"{name}.json"
    if out.is_dir() or not out.parent.is_dir():
        raise ValueError(f"--output {out}: pass a file path in an existing folder")  # before minutes of measuring
    ranks, logp = recorded_ranks(folder) if backend != "mlx" else (None, None)
    model, tokenizer = backends.load(backend, opts.model, heads_dir, [[0]], device=opts.device)
    prompts = read_prompts(opts.prompts or DEFAULT_HELDOUT)
    if ranks is None:
        ranks, logp = heldout_accuracy(model, tokenizer, opts, prompts)
        np.save(folder / RANKS_FILE, ranks.astype(np.int16))
        np.save(folder / LOGPROBS_FILE, logp.astype(np.float16))
    top, cond = print_accuracy(ranks, opts.topk)
    result = choose_tree(model, opts, ranks, cond)
    choices = result.pop("choices")
    result.update(backend=backend, pass_overhead_ms=opts.pass_overhead_ms, max_nodes=opts.max_nodes, min_nodes=opts.min_nodes, context=opts.context,
                  heldout_rows=int(len(ranks)),
                  head_topk_accuracy=[[round(float(a), 4) for a in row] for row in top],
                  head_conditional_accuracy=[[round(float(a), 4) for a in row] for row in cond])
    if logp is not None:  # dynamic trees read the heads' probabilities, calibrated to acceptance here
        result["calibration"] = fit_calibration(logp.astype(np.float64), ranks).to_json()
        print(f"calibration (dynamic trees): {result['calibration']}")
    tuned = replace(model, rows_product=result["rows_product"], facts=result)  # the model as it will load
    if opts.num_prompts > 0:
        check_generation(tuned, tokenizer, prompts[: opts.num_prompts], choices, opts, result)
    if opts.batch_sizes:
        result["batch_latency"] = batch_costs(tuned, opts, len(choices) + 1)
    save_tree(out, choices, **result)
    print(f"saved tree to {out}")
    return result


if __name__ == "__main__":
    main()
