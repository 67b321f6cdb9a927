"""Make exo 0.0.x build our engines: ``register_with_exo()``, once, before the node starts.

exo picks engines by name from a hard-coded table and model cards by the engine's class
name, so registering patches them at run time: our names (and any package's under the
``exo.inference_engines`` entry points), a wrapped ``get_inference_engine``, card repos
(``cards.py``), our engines as virtual subclasses of exo's ``InferenceEngine``, and a guard
on ``select_best_inference_engine``, which would silently replace them. Without exo it
does nothing and returns a falsy ``Registration`` saying so. ``hookup.install()`` adds
the node change for Medusa and a serializer that carries our state.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points

from .cards import add_model_cards
from ..engine.contract import InferenceEngine

ENTRY_POINT_GROUP = "exo.inference_engines"
ENGINES = {  # name -> "module:Class"; the package resolves the torch engine lazily, with a clear error
    "medusa-mlx": "exo_medusa_mlx.exo:MedusaMLXInferenceEngine",
    "medusa-torch": "exo_medusa_mlx.exo:MedusaTorchInferenceEngine",
}
_NODE_MODULES = ("exo.orchestration.node", "exo.orchestration.standard_node")
_MARK = "__exo_medusa_wrapped__"


@dataclass(frozen=True)
class Registration:
    """What ``register_with_exo`` did; falsy when nothing was registered."""

    registered: bool
    detail: str
    engines: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.registered


def engine_table() -> dict[str, str]:
    """Engine name -> "module:Class": ours, then the ``exo.inference_engines`` entry points."""
    table = dict(ENGINES)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        table.setdefault(ep.name, ep.value)
    return table


def build_engine(name: str, shard_downloader, table: dict[str, str] | None = None):
    """Construct the engine registered as ``name``."""
    table = table if table is not None else engine_table()
    if name not in table:
        raise ValueError(f"unknown inference engine '{name}': known {', '.join(sorted(table))}")
    module, _, cls = table[name].partition(":")
    return getattr(importlib.import_module(module), cls)(shard_downloader)


def _exo_engine_module():
    try:
        return importlib.import_module("exo.inference.inference_engine"), None
    except ModuleNotFoundError as e:
        if e.name == "exo":
            return None, "exo is not installed (install exo 0.0.x from its repository; PyPI's 'exo' is another project)"
        if e.name in ("exo.inference", "exo.inference.inference_engine"):
            return None, "the installed 'exo' is not exo 0.0.x (no exo.inference.inference_engine)"
        raise


def _wrap_get_engine(ie, table: dict[str, str]) -> None:
    orig = ie.get_inference_engine
    if getattr(orig, _MARK, False):
        return

    @functools.wraps(orig)
    def get_inference_engine(inference_engine_name, shard_downloader, *args, **kwargs):
        if inference_engine_name in table:
            return build_engine(inference_engine_name, shard_downloader, table)
        return orig(inference_engine_name, shard_downloader, *args, **kwargs)

    setattr(get_inference_engine, _MARK, True)
    for name, module in list(sys.modules.items()):
        if (name == "exo" or name.startswith("exo.")) and getattr(module, "get_inference_engine", None) is orig:
            module.get_inference_engine = get_inference_engine


def _add_model_cards(table: dict[str, str]) -> tuple[int, list[str]]:
    try:
        models = importlib.import_module("exo.models")
    except ImportError:
        return 0, []
    cards = getattr(models, "model_cards", None)
    if not isinstance(cards, dict):
        return 0, []
    return add_model_cards(cards, {name: value.partition(":")[2] for name, value in table.items()})


def _register_abc(ie) -> bool:
    """Our engines as virtual subclasses of exo's ``InferenceEngine`` (``isinstance`` holds)."""
    exo_abc = getattr(ie, "InferenceEngine", None)
    if exo_abc is None or not hasattr(exo_abc, "register"):
        return False
    if not issubclass(InferenceEngine, exo_abc):
        exo_abc.register(InferenceEngine)
    return True


def _is_ours(engine) -> bool:
    from ..engine.shard_engine import MedusaShardEngine

    return isinstance(engine, MedusaShardEngine)


def _guard_node_class(cls) -> bool:
    orig = cls.__dict__.get("select_best_inference_engine")
    if orig is None or getattr(orig, _MARK, False):
        return False

    def holds_ours(node) -> bool:
        return any(_is_ours(v) for v in vars(node).values())

    if inspect.iscoroutinefunction(orig):
        @functools.wraps(orig)
        async def guarded(self, *args, **kwargs):
            if holds_ours(self):
                return None  # keep our engine: exo would rebuild one from class-name-derived names
            return await orig(self, *args, **kwargs)
    else:
        @functools.wraps(orig)
        def guarded(self, *args, **kwargs):
            if holds_ours(self):
                return None
            return orig(self, *args, **kwargs)

    setattr(guarded, _MARK, True)
    cls.select_best_inference_engine = guarded
    return True


def _guard_nodes() -> int:
    for name in _NODE_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
    guarded = 0
    for name, module in list(sys.modules.items()):
        if not (name == "exo" or name.startswith("exo.")) or module is None:
            continue
        for obj in list(vars(module).values()):
            if inspect.isclass(obj) and obj.__module__ == name:
                guarded += _guard_node_class(obj)
    return guarded


def register_with_exo() -> Registration:
    """Register our engines with exo 0.0.x if it is importable; safe to call twice."""
    ie, why = _exo_engine_module()
    if ie is None:
        return Registration(False, why)
    table = engine_table()
    ie.inference_engine_classes.update({name: value.partition(":")[2] for name, value in table.items()})
    _wrap_get_engine(ie, table)
    cards, corrected = _add_model_cards(table)
    nodes = _guard_nodes()
    abc = "our engines are exo InferenceEngines" if _register_abc(ie) else "exo has no InferenceEngine ABC"
    fixed = f", layer counts corrected: {'; '.join(corrected)}" if corrected else ""
    return Registration(True, f"registered {', '.join(table)} with exo ({cards} model card repos added{fixed}, "
                              f"{nodes} node classes guarded, {abc})", tuple(table))
