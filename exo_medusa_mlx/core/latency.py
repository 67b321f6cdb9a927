"""What a decoding step costs on this machine, measured through the step itself; and fitting a tree
to a machine at load time when none was tuned on it (framework-neutral: the model's primitives only).

``measure_latency`` times ``Verifier.verify`` + ``advance`` for trees of every size,
``measure_plain_step`` the one-step-ahead plain decoding a tree must beat, and
``measure_gather`` a commit that moves nodes. ``fit_to_machine`` runs a few seconds of
the same probes at load and picks the tree and the product layout (``rows_product``)
with the most expected tokens per second, never a tree slower than plain decoding.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .accept import make_policy
from .growth import TOPK, grow_tree
from .machine import cache_root, this_machine
from .step import ROOT_ONLY, Sequence, Verifier, advance, generate_step, prefill
from .tree import build_tree, tree_choices

MAX_LATENCY_NODES = 64
PROBE_NODES = 8  # the load-time probe's largest tree (CPU-sized; ``mlx_medusa tune`` goes further)


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


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.perf_counter() > deadline:
        raise TimeoutError("the probe ran out of time")


def measure_latency(model, sizes, context: int = 128, repeats: int = 5, seed: int = 0,
                    progress: bool = True, deadline: float | None = None) -> tuple[dict[int, float], float]:
    """Median seconds of one decoding step with N tree tokens over a prefilled cache.

    A step is the one every decoder runs (``Verifier.verify``: the forward, the
    base logits and the heads' guesses at every node, the verdict; then
    ``advance``: the acceptance and the next tree) with nothing committed, so
    every step sees ``context`` cached tokens; a commit that must gather nodes out
    of place costs extra (``measure_gather``). A size is timed on its second step
    in a row (decoding repeats one shape; the first step after another size runs
    cold), and sizes go round-robin so load changes on a shared machine hit them
    all alike. Also returns the host's share of a step (the acceptance). Past
    ``deadline`` (``time.perf_counter``), ``TimeoutError``.
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
        v = Verifier(model, ctx, caches, tree, policy).verify(Sequence(ctx, policy, tree, tokens))
        t1 = time.perf_counter()
        advance(policy, tree, tokens, v)
        t2 = time.perf_counter()
        if n > 1:
            host.append(t2 - t1)
        return t2 - t0

    for _ in tqdm(range(repeats), desc="latency", unit="pass", disable=not progress):
        for n in sizes:
            _check_deadline(deadline)
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


def measure_plain_step(model, context: int = 128, tokens: int = 16, repeats: int = 3, seed: int = 0,
                       deadline: float | None = None) -> float:
    """Seconds per token of plain greedy decoding as ``generate`` runs it (one step ahead), after ``context`` tokens.

    Plain decoding queues the next forward before reading the current token, so
    it runs a little faster than one synchronous step: this, not latency(1), is
    the baseline a tree must beat.
    """
    prompt = np.random.default_rng(seed).integers(0, model.vocab_size, context)
    per_token = []
    for _ in range(repeats):
        _check_deadline(deadline)
        steps = generate_step(prompt, model, tree=ROOT_ONLY)
        next(steps)  # the prefill
        next(steps)  # first decode step (pipeline warm-up)
        t0 = time.perf_counter()
        for _ in range(tokens):
            next(steps)
        per_token.append((time.perf_counter() - t0) / tokens)
        steps.close()
    return float(np.median(per_token))


# --------------------------------------------------------------------------- fitting a tree at load time

PROBE_BUDGET_S = 30.0  # the load-time probe gives up after this long (and measures again at the next load)
PROBE_ATTEMPTS = 3
DRIFT = 0.25  # plain steps timed this much apart (before/after a probe, or now/cached) mean the load moved
PLAUSIBLE = 1.1  # a speed-up above the expected accepted length (times this, for timing noise) is impossible


def probe(model, accuracies, max_nodes: int = PROBE_NODES, context: int = 64,
          budget_s: float = PROBE_BUDGET_S) -> dict | None:
    """A few seconds of the step on this machine: the tree (at most ``max_nodes``) and the product
    layout with the most expected tokens per second, given the heads' conditional accuracies.
    The root alone (plain decoding) is among the candidates, so the pick is never slower.

    A measurement the machine's load could have skewed is taken again (``PROBE_ATTEMPTS`` in
    all, within ``budget_s``): plain steps timed before and after the trees that differ by
    more than ``DRIFT``, or a pick predicted faster than its expected accepted length allows.
    Returns None when no measurement held together.
    """
    acc = np.asarray(accuracies, dtype=np.float64)[: model.heads.num_heads, : min(TOPK, model.heads.config.candidates)]
    deadline = time.perf_counter() + budget_s
    for attempt in range(PROBE_ATTEMPTS):
        try:
            pick, doubt = _measure_pick(model, acc, max_nodes, context, deadline)
        except TimeoutError:
            return None
        if doubt is None:
            return pick
        print(f"exo-medusa: probe {attempt + 1} discarded: {doubt}", file=sys.stderr)
    return None


def _measure_pick(model, acc: np.ndarray, max_nodes: int, context: int, deadline: float) -> tuple[dict, str | None]:
    """One probe: (the pick, None), or (the pick, why it cannot be trusted)."""
    before = measure_plain_step(model, context, tokens=8, repeats=2, deadline=deadline)
    curves = {rows: measure_latency(replace(model, rows_product=rows), range(2, max_nodes + 1), context, repeats=2,
                                    progress=False, deadline=deadline)[0] for rows in (True, False)}
    after = measure_plain_step(model, context, tokens=8, repeats=2, deadline=deadline)
    plain = (before + after) / 2
    best = None
    for rows, curve in curves.items():
        choices, info = grow_tree(acc, {1: plain, **curve}, max_nodes, return_info=True)
        if best is None or info["speedup"] > best["predicted_speedup"] * (1 + 1e-9):
            best = {"choices": choices, "rows_product": rows, "predicted_speedup": info["speedup"],
                    "expected_accept_length": info["expected_accept_length"], "plain_step": plain,
                    "latency_curve": {n: round(t, 6) for n, t in curve.items()}}
    if moved(before, after):
        return best, f"plain steps took {before * 1e3:.1f} then {after * 1e3:.1f} ms: the machine's load changed"
    if best["predicted_speedup"] > best["expected_accept_length"] * PLAUSIBLE:
        return best, (f"predicted {best['predicted_speedup']:.2f}x for a tree expected to accept "
                      f"{best['expected_accept_length']:.2f} tokens per step: the timings cannot be right")
    return best, None


def moved(a: float, b: float) -> bool:
    """Whether two timings of the same step differ by more than ``DRIFT``."""
    return not (a > 0 and b > 0) or abs(np.log(a / b)) > np.log1p(DRIFT)


def tuned_facts(tree_file) -> dict:
    """What a tree file (``mlx_medusa tune``'s output) records: its choices, accuracies, machine..."""
    path = Path(tree_file) if isinstance(tree_file, (str, Path)) else None
    if path is None or path.suffix != ".json" or not path.is_file():
        return {}
    facts = json.loads(path.read_text())
    return facts if isinstance(facts, dict) else {}


def fit_to_machine(model, facts: dict, source: str, probe_here: bool = True):
    """The model with the tree and product layout for this machine.

    ``facts``: the tuned tree file's (``tuned_facts``). Tuned on this machine: its
    ``rows_product`` applies. Else, with ``probe_here`` and the heads' accuracies in the
    file, a load-time ``probe`` picks both, cached per heads and machine. A cached pick is
    checked against a quick plain-step timing at each load and measured again when the
    machine's figures moved; a probe that found no consistent timing is not cached (the
    model is returned as it is, and the next load measures again).
    """
    here = this_machine(model.device)
    if model.heads is None:
        return model
    if facts.get("machine") == here:
        return replace(model, rows_product=bool(facts.get("rows_product", True)))
    acc = facts.get("head_conditional_accuracy")
    if not probe_here or acc is None:
        return model
    key = hashlib.sha1(json.dumps([source, acc, here, type(model).__module__], sort_keys=True).encode()).hexdigest()
    cached = cache_root() / "probed" / f"{key[:16]}.json"
    pick = _cached_pick(model, cached)
    if pick is None:
        t0 = time.perf_counter()
        pick = probe(model, acc)
        if pick is None:
            print(f"exo-medusa: no consistent timing of this machine within {PROBE_BUDGET_S:.0f} s (is it busy?): "
                  "keeping the heads' tree for now; the next load measures again", file=sys.stderr)
            return model
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(json.dumps({**pick, "machine": here, "source": source}))
        tmp.replace(cached)
        print(f"exo-medusa: no tree tuned for this machine ({here['cpu']}, {here['device']}): probed "
              f"{time.perf_counter() - t0:.1f} s, picked {len(pick['choices']) + 1} nodes, transposed product "
              f"{'on' if pick['rows_product'] else 'off'}, predicted {pick['predicted_speedup']:.2f}x "
              f"(mlx_medusa tune measures more)", file=sys.stderr)
    return replace(model, tree=build_tree(pick["choices"]), rows_product=bool(pick["rows_product"]))


def _cached_pick(model, cached: Path) -> dict | None:
    """The cached pick, unless a quick plain-step timing says the machine's figures moved since."""
    if not cached.is_file():
        return None
    try:
        pick = json.loads(cached.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(pick, dict) or not isinstance(pick.get("plain_step"), (int, float)):
        return None  # written before picks recorded their plain step: measure again
    now = measure_plain_step(model, 64, tokens=4, repeats=1)
    if moved(now, pick["plain_step"]):
        print(f"exo-medusa: a plain step takes {now * 1e3:.1f} ms now, {pick['plain_step'] * 1e3:.1f} ms when "
              "the tree was probed: probing again", file=sys.stderr)
        return None
    return pick
