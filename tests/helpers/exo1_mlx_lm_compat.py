"""exo 1.x's own batched engine on PyPI's mlx-lm: for the exo 1.x test and bench venv only.

``scripts/setup_exo1.sh`` copies this module into that venv with a ``.pth`` line calling
``install()``, so every process of the venv (exo's runners included) has it; nothing of
exo and nothing of the project changes. It is not part of the package.

Why: exo replaces mlx-lm's ``GenerationBatch._step`` (``exo.worker.engines.mlx.patches.
opt_batch_gen``) with a version written for exo's mlx-lm fork, which leaves the batch's
log-probabilities as one (B, V) array. PyPI's mlx-lm keeps them as a list of rows and
extends that list when a request joins a running batch (``GenerationBatch.extend``), so
exo's ``BatchGenerator`` fails on its second request: "'mlx.core.array' object has no
attribute 'extend'". Here ``extend`` first turns an array into its list of rows (what
PyPI's ``_step`` would have left), and exo's step reads either form.

The patch waits for ``mlx_lm.generate`` to be imported (an import hook): importing it,
and so MLX, at interpreter start would load MLX before a runner has loaded its BLAS.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

TARGET = "mlx_lm.generate"
MARK = "_exo1_rows_as_lists"


def patch(module) -> None:
    """Make ``module.GenerationBatch.extend`` accept log-probabilities kept as one array."""
    import mlx.core as mx

    batch_cls = module.GenerationBatch
    extend = batch_cls.extend
    if getattr(extend, MARK, False):
        return

    def extend_rows(self, batch):
        for b in (self, batch):
            for name in ("_current_logprobs", "_next_logprobs"):
                value = getattr(b, name)
                if isinstance(value, mx.array):
                    setattr(b, name, list(value))
        return extend(self, batch)

    setattr(extend_rows, MARK, True)
    batch_cls.extend = extend_rows


class _PatchAfterLoad(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchAfterLoad(spec.loader)
        return spec


def install() -> None:
    """Patch ``mlx_lm.generate`` when it is imported (now, if it already is)."""
    if TARGET in sys.modules:
        patch(sys.modules[TARGET])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
