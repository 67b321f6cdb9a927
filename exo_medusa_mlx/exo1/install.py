"""``install()``: exo 1.x chooses Medusa per model at run time, with no edit of exo's files.

exo 1.x builds its engine inside each runner, a process ``RunnerSupervisor`` spawns with
exo's ``bootstrap.entrypoint`` as its target. ``install()``, called in exo's own process
before any runner starts, gives the supervisor ``runner_entrypoint`` instead:
multiprocessing pickles a target by its module and name, so every runner runs this
first: it gives MLX its OpenBLAS (``setup_blas``, before anything imports MLX), wraps
exo's ``MlxBuilder.build`` (``choose.patch_builder``) and runs exo's own
``entrypoint``. It also lets exo's model cards carry a ``medusa`` field (``cards.py``).
Safe to call again: a second call changes nothing and says so.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .cards import load_card_without_medusa

_SUPERVISOR = "exo.worker.runner.supervisor"
_CARDS = "exo.shared.models.model_cards"
MARK = "_exo_medusa"


@dataclass(frozen=True)
class Installation:
    """What ``install`` changed in exo's process."""

    patched: tuple[str, ...]

    def __str__(self) -> str:
        if not self.patched:
            return "exo-medusa: already installed in exo 1.x; nothing changed"
        return (f"exo-medusa: patched {', '.join(self.patched)}: each runner decodes with Medusa where its model "
                "has heads, else with exo's own engine")


def runner_entrypoint(*args, **kwargs) -> None:
    """A runner's target: exo's ``bootstrap.entrypoint`` with ``MlxBuilder.build`` choosing Medusa."""
    from .._blas import setup_blas

    setup_blas()  # before exo's entrypoint imports MLX
    from .choose import patch_builder

    patch_builder()
    importlib.import_module("exo.worker.runner.bootstrap").entrypoint(*args, **kwargs)


setattr(runner_entrypoint, MARK, True)


def install(quiet: bool = False) -> Installation:
    """Hook Medusa into the importable exo 1.x (this process and the runners it spawns).

    Raises ImportError when exo 1.x's runner cannot be imported.
    """
    try:
        supervisor = importlib.import_module(_SUPERVISOR)
        cards = importlib.import_module(_CARDS)
    except ImportError as e:
        raise ImportError(f"cannot import exo 1.x's runner ({e}): run this in exo's environment (Python 3.13, "
                          "exo installed)") from e
    if not callable(getattr(supervisor, "entrypoint", None)) or not hasattr(cards.ModelCard, "load_from_path"):
        raise ImportError("this exo has no runner entrypoint or card loader where exo 1.x keeps them "
                          f"({_SUPERVISOR}.entrypoint, {_CARDS}.ModelCard.load_from_path): not exo 1.x")
    patched = []
    if not getattr(supervisor.entrypoint, MARK, False):
        supervisor.entrypoint = runner_entrypoint
        patched.append("RunnerSupervisor's runner entrypoint")
    if not getattr(cards.ModelCard.load_from_path, MARK, False):
        load = load_card_without_medusa(cards.ModelCard)
        setattr(load, MARK, True)
        cards.ModelCard.load_from_path = staticmethod(load)
        patched.append("ModelCard.load_from_path (the 'medusa' card field)")
    done = Installation(tuple(patched))
    if not quiet:
        print(done, flush=True)
    return done
