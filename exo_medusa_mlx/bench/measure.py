"""How one decoder run is measured (tokens and generation tokens/s, counted the same way for
every method), the machine it ran on, and how results are written; for ``bench`` and its suites."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import sys
import time
from pathlib import Path

from ..cli_args import fail
from ..core.dynamic import DynamicTree


def machine() -> dict:
    import mlx.core as mx

    from .._blas import blas_info
    from ..core.machine import cpu_name

    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(), "mlx": mx.__version__,
            "mlx_device": str(mx.default_device()), "blas": blas_info(), "python": platform.python_version()}
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    return info


def tree_facts(model) -> dict:
    """What a run verifies with: the tree (a dynamic plan: ``choices`` "dynamic", ``size`` its most
    nodes; the runs record the mean size used, ``mean_tree_size``) and the product layout."""
    tree = model.tree
    choices = "dynamic" if isinstance(tree, DynamicTree) else [list(c) for c in tree.choices]
    return {"size": tree.size, "choices": choices, "rows_product": model.rows_product}


def timed(responses):
    """Tokens (EOS dropped) and generation tokens/s measured the same way for every
    method: tokens after the first over the time since the first arrived (mlx-lm's
    own figure counts the first token too, which flatters short runs)."""
    toks, last, first, n = [], None, None, 0
    for last in responses:
        n += 1
        if first is None:
            first = time.perf_counter()
        if last.finish_reason != "stop":
            toks.append(last.token)
    dt = time.perf_counter() - first
    return toks, last, (n - 1) / dt if n > 1 and dt > 0 else 0.0


def run_ours(model, tokenizer, ids, max_tokens, medusa, stream, temp=0.0, seed=0):
    toks, last, tps = timed(stream(model, tokenizer, ids, max_tokens=max_tokens, medusa=medusa, temp=temp,
                                    seed=seed))
    return {"tokens": toks, "generation_tps": tps, "prompt_tps": last.prompt_tps,
            "mean_accepted": last.mean_accepted, "mean_tree_size": last.mean_tree_size, "steps": last.steps,
            "peak_memory_gb": last.peak_memory}


def run_mlx_lm(base, tokenizer, ids, max_tokens, temp=0.0, seed=0):
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(seed)
    toks, last, tps = timed(stream_generate(base, tokenizer, mx.array(ids), max_tokens=max_tokens,
                                             sampler=make_sampler(temp)))
    return {"tokens": toks, "generation_tps": tps, "prompt_tps": last.prompt_tps,
            "mean_accepted": 1.0, "steps": len(toks), "peak_memory_gb": last.peak_memory}


def remove_file(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def write_whole(path: Path, text: str) -> None:
    """Whole or not at all: a temporary file beside it, renamed; never left behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        remove_file(tmp)


def save(path: Path, text: str) -> None:
    """Write a result file; if that fails, put the text in a temporary file (or on stdout) and
    exit with one line saying where the results are (a run is minutes of measuring)."""
    try:
        write_whole(path, text)
        return
    except OSError as e:
        why = e.strerror or str(e)
    try:
        fd, spare = tempfile.mkstemp(prefix=f"mlx_medusa-{path.stem}-", suffix=path.suffix)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except OSError:
        print(text)
        fail(f"cannot write {path} ({why}); the results are printed above")
    fail(f"cannot write {path} ({why}); the results are in {spare}")


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as a PNG, whole or not at all (see ``write_whole``), and close it."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        tmp.replace(path)
    finally:
        plt.close(fig)
        remove_file(tmp)


def write_results(out: Path, name: str, result: dict, md: str, plot) -> None:
    """``out/name.json``, ``.md`` and ``.png`` (``plot(result, path)``; a plot that fails is a note)."""
    save(out / f"{name}.json", json.dumps(result, indent=1))
    save(out / f"{name}.md", md + "\n")
    try:
        plot(result, out / f"{name}.png")
    except (OSError, ImportError) as e:
        print(f"note: no plot ({e})", file=sys.stderr)
    print(f"wrote {out}/{name}.json, {name}.md, {name}.png")
