"""Which engine an exo 1.x runner builds: Medusa where the model has heads Medusa can use, else exo's own.

``patch_builder()`` (run in each runner process by ``install.runner_entrypoint``) wraps
exo's ``MlxBuilder.build``: after exo has loaded (and sharded) the model, ``medusa_for``
looks for heads and checks the architecture; with heads it returns a ``MedusaEngine``
holding exo's own parts (tool parser, channels, group), otherwise exo's own engine,
untouched, and the runner's log says why once.

Heads, in order: beside the model in exo's models folder (``<org>--<name>/medusa/``, or
heads files in that folder); the model card's ``medusa`` field (``cards.py``); the heads
shipped for the default model. ``EXO_MEDUSA=off`` runs exo's own engine for every model.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import fields
from pathlib import Path

from .._blas import blas_info
from ..core.heads_format import default_heads_for, find_heads
from ..default_model import DEFAULT_MODEL_ID
from .cards import CARD_KEY, card_entry, resolve_entry

MARK = "_exo_medusa"  # on the patched build: a second patch changes nothing
OFF_VALUES = ("0", "off", "false", "no")


def _exo_logger():
    # bootstrap.entrypoint swaps in the supervisor's logger; read it when logging, not at import.
    return importlib.import_module("exo.worker.runner.bootstrap").logger


def _card_dirs() -> list[Path]:
    from exo.shared.constants import EXO_CUSTOM_MODEL_CARDS_DIR, RESOURCES_DIR

    return [Path(RESOURCES_DIR) / "inference_model_cards", Path(EXO_CUSTOM_MODEL_CARDS_DIR)]


def heads_for(model_id: str) -> tuple[Path | None, str]:
    """(the heads for ``model_id``, where they came from), or (None, why there are none)."""
    from exo.shared.constants import EXO_MODELS_DIRS

    folders = [Path(d) / model_id.replace("/", "--") for d in EXO_MODELS_DIRS]
    for folder in folders:
        if folder.is_dir() and (found := find_heads(folder)) is not None:
            return found, f"beside the model ({found})"
    entry, card = card_entry(model_id, _card_dirs())
    if entry is not None:
        found = resolve_entry(entry, EXO_MODELS_DIRS)
        if found is None or find_heads(found) is None:
            return None, (f"its model card ({card}) names heads '{entry}', but no heads are there (looked in "
                          f"{', '.join(str(d) for d in EXO_MODELS_DIRS)}): download them there")
        return find_heads(found), f"named by its model card ({card}: {find_heads(found)})"
    if model_id == DEFAULT_MODEL_ID and (shipped := default_heads_for(None)) is not None:
        return shipped, f"shipped for the default model ({shipped})"
    return None, f"no Medusa heads (none in {folders[0] / 'medusa'}, no '{CARD_KEY}' field in its model card)"


def unsupported(base) -> str | None:
    """Why Medusa cannot drive exo's loaded model, or None when it can."""
    from ..model import SUPPORTED_MODEL_TYPES, check_supported

    mtype = getattr(getattr(base, "args", None), "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        return f"model type '{mtype}' is not supported by Medusa (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    try:
        check_supported(base)
    except ValueError as e:
        return str(e)
    return None


def medusa_for(builder):
    """(exo's loaded model with the heads beside it, the account) or (None, why exo's engine runs)."""
    if os.environ.get("EXO_MEDUSA", "").strip().lower() in OFF_VALUES:
        return None, "EXO_MEDUSA=off"
    if getattr(builder, "vision_processor", None) is not None:
        return None, "a vision model (Medusa decodes text only)"
    why = unsupported(builder.inference_model)
    if why is not None:
        return None, why
    heads, where = heads_for(str(builder.model_id))
    if heads is None:
        return None, where
    from ..core.attach import attach
    from ..model import MedusaModel

    # Each rank may hold part of the model (exo split it): no load-time probe.
    model = attach(builder.inference_model, heads, None, MedusaModel, model_id=str(builder.model_id), probe=False)
    return model, f"heads {where}, a {model.tree.size}-node tree"


def medusa_build(builder, exo_build):
    """``MlxBuilder.build`` with Medusa: exo's engine, or a ``MedusaEngine`` made of exo's parts."""
    log = _exo_logger()
    medusa, account = medusa_for(builder)
    if medusa is None:
        log.info(f"exo-medusa: {builder.model_id} runs exo's own engine: {account}")
        return exo_build(builder)
    # exo's own sequential generator, for the parts exo chose (tool parser, prefix cache, channels).
    # EXO_NO_BATCH is read by this call only; the Medusa engine takes one task at a time.
    before = os.environ.get("EXO_NO_BATCH")
    os.environ["EXO_NO_BATCH"] = "1"
    try:
        plain = exo_build(builder)
    finally:
        if before is None:
            os.environ.pop("EXO_NO_BATCH", None)
        else:
            os.environ["EXO_NO_BATCH"] = before
    from .engine import MedusaEngine

    parts = {f.name: getattr(plain, f.name) for f in fields(plain) if f.init}
    log.info(f"exo-medusa: {builder.model_id} decodes with Medusa: {account}; MLX's BLAS: {blas_info()}")
    return MedusaEngine(**parts, medusa=medusa)


def patch_builder() -> bool:
    """Wrap exo's ``MlxBuilder.build`` in this process; False when it already was."""
    from exo.worker.engines.mlx.patches import apply_mlx_patches

    apply_mlx_patches()  # as exo's bootstrap does before it imports its builder
    from exo.worker.engines.mlx.builder import MlxBuilder

    if getattr(MlxBuilder.build, MARK, False):
        return False
    exo_build = MlxBuilder.build

    @functools.wraps(exo_build)
    def build(self):
        return medusa_build(self, exo_build)

    setattr(build, MARK, True)
    MlxBuilder.build = build
    return True
