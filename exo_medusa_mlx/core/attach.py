"""Heads and a tree attached to a loaded base model, written once for every loader: both
backends' ``load``, their shard engines and exo 1.x's builder. And the weights' dtype they load.

The backend is its ``MedusaModel`` class (``core.base.MedusaBase``): it names the tuned tree
file it reads (``backend``), loads heads for a base model in the base's dtype and on its
device (``heads_for``), and says whether a load may probe this machine (``probes_at_load``).
"""

from __future__ import annotations

from pathlib import Path

from .base import MedusaBase
from .dynamic import checked_spec
from .heads_format import default_tree_for
from .latency import fit_to_machine, tuned_facts
from .tree import ROOT_ONLY, TreeBuffers

DTYPES = ("float32", "float16", "bfloat16")  # the weights' dtypes a load takes by name
CPU_DTYPE = "float32"  # exact, and on a CPU bfloat16/float16 products skip the fast BLAS


def weights_dtype(requested: str | None, on_cpu: bool, accelerator: str | None = None) -> str | None:
    """The weights' dtype by name: the one asked for; else float32 on a CPU; else ``accelerator``,
    the backend's default on a GPU (None: the checkpoint's own)."""
    if requested is not None:
        if requested not in DTYPES:
            raise ValueError(f"dtype '{requested}' is not supported: use one of {', '.join(DTYPES)}")
        return requested
    return CPU_DTYPE if on_cpu else accelerator


def _tuned(heads: str | Path | None, backend: str):
    return default_tree_for(Path(heads) if heads is not None else None, backend)


def check_tree(heads: str | Path | None, tree, backend: str) -> TreeBuffers | str:
    """The tree ``attach`` will resolve, resolved now: a load calls it first, so that a bad tree
    (or one over the size cap) fails before minutes of loading. A spec the heads resolve
    (``dynamic[:N]``, ``best:N``) is checked for its form and returned as it is."""
    return checked_spec(tree if tree is not None else _tuned(heads, backend))


def attach(base, heads: str | Path | None, tree, backend: type[MedusaBase], *, model_id: str | None = None,
           probe: bool = True) -> MedusaBase:
    """``base`` (the backend's own loaded model) with Medusa heads and a tree attached.

    Args:
        heads: heads folder or file; None decodes plainly (the tree is then the root alone).
        tree: preset, JSON file, choices, buffers, ``dynamic[:N]`` or ``best:N`` (``MedusaBase.plan``,
            from the tuned facts: calibration, costs); None for the tree tuned beside the heads for
            this backend (else the CPU default), fitted to this machine (``fit_to_machine``: the
            tuned product layout where it was tuned here; else, if ``probe`` and the backend's
            ``probes_at_load``, a few-second probe picks the tree).
        backend: the backend's ``MedusaModel`` class.
        probe: False where the model is not whole in this process (a shard, a rank of a split
            model), which cannot run the probe.
    """
    if heads is None:
        return backend(base, None, ROOT_ONLY, model_id=model_id)
    heads = Path(heads)
    tuned = _tuned(heads, backend.backend)
    facts = tuned_facts(tuned)
    spec = checked_spec(tree if tree is not None else tuned)
    model = backend(base, backend.heads_for(base, heads), spec, model_id=model_id, facts=facts)
    if tree is None:
        model = fit_to_machine(model, facts, str(heads), probe_here=probe and backend.probes_at_load)
    return model
