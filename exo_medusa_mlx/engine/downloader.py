"""A shard downloader that serves local model folders and the default model (no network).

exo's downloaders fetch a model card's repo for the engine's class name and
return the folder; this one maps model ids to folders on disk, so tests and
offline rings need nothing else. Medusa heads come from an explicit mapping, a
``medusa/`` folder inside the model folder, or heads files beside the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

from ..default_model import DEFAULT_MODEL_ID
from ..core.heads_format import default_heads_for, find_heads
from ..core.model_files import read_config
from .shard import Shard, as_shard

DEFAULT_MODEL_ALIASES = (DEFAULT_MODEL_ID, "smollm2-135m")


def config_layers(folder: Path) -> int | None:
    """``num_hidden_layers`` from a model folder's config.json (None if it does not say)."""
    config = read_config(folder)
    text = config.get("text_config")
    n = config.get("num_hidden_layers", text.get("num_hidden_layers") if isinstance(text, dict) else None)
    return n if isinstance(n, int) and not isinstance(n, bool) else None


class _Callback:
    def __init__(self):
        self.observers: list[Callable] = []

    def on_next(self, fn: Callable) -> None:
        self.observers.append(fn)

    def set(self, *args) -> None:
        for fn in self.observers:
            fn(*args)


class ProgressCallbacks:
    """exo's progress callback shape: ``register(name).on_next(fn)``, ``trigger_all(shard, event)``."""

    def __init__(self):
        self.callbacks: dict[str, _Callback] = {}

    def register(self, name: str) -> _Callback:
        return self.callbacks.setdefault(name, _Callback())

    def deregister(self, name: str) -> None:
        self.callbacks.pop(name, None)

    def trigger_all(self, *args) -> None:
        for callback in list(self.callbacks.values()):
            callback.set(*args)


class LocalShardDownloader:
    """Model ids to local Hugging Face folders; the default model is always served.

    Args:
        models: model id -> folder. A model id that is itself a folder is served too.
        heads: model id -> Medusa heads folder or file (else ``find_heads`` on the folder).
        trees: model id -> tree spec (preset, JSON file or choices); else the heads' tuned tree.
    """

    def __init__(self, models: Mapping[str, str | Path] | None = None,
                 heads: Mapping[str, str | Path] | None = None, trees: Mapping[str, object] | None = None):
        self.models = {k: Path(v) for k, v in (models or {}).items()}
        self.heads = {k: Path(v) for k, v in (heads or {}).items()}
        self.trees = dict(trees or {})
        self._progress = ProgressCallbacks()

    @property
    def on_progress(self) -> ProgressCallbacks:
        """Where exo's main registers its download-progress broadcast; local folders never
        download, so nothing is triggered."""
        return self._progress

    def register(self, model_id: str, folder: str | Path, heads: str | Path | None = None, tree=None) -> None:
        self.models[model_id] = Path(folder)
        if heads is not None:
            self.heads[model_id] = Path(heads)
        if tree is not None:
            self.trees[model_id] = tree

    def model_path(self, model_id: str) -> Path:
        if model_id in self.models:
            folder = self.models[model_id]
        elif model_id in DEFAULT_MODEL_ALIASES:
            from ..default_model import default_model_path

            folder = default_model_path()
        elif Path(model_id).expanduser().is_dir():
            folder = Path(model_id).expanduser()
        else:
            known = sorted({*self.models, *DEFAULT_MODEL_ALIASES})
            raise FileNotFoundError(f"model '{model_id}' is not served here (known: {', '.join(known)}); "
                                    "register its local folder with LocalShardDownloader(models={id: path})")
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"model '{model_id}': {folder} has no config.json; give a Hugging Face folder")
        return folder

    def heads_path(self, model_id: str, folder: Path | None = None) -> Path | None:
        if model_id in self.heads:
            return self.heads[model_id]
        folder = folder if folder is not None else self.model_path(model_id)
        found = find_heads(folder)
        return default_heads_for(None) if found is None and model_id in DEFAULT_MODEL_ALIASES else found

    def tree_spec(self, model_id: str):
        return self.trees.get(model_id)

    async def ensure_shard(self, shard: Shard, inference_engine_name: str = "") -> Path:
        """The model folder for ``shard``, checked against its layer count."""
        shard = as_shard(shard)
        folder = self.model_path(shard.model_id)
        n = config_layers(folder)
        if n is not None and n != shard.n_layers:
            raise ValueError(f"shard of '{shard.model_id}' says {shard.n_layers} layers but the model has {n} "
                             f"({folder / 'config.json'}); use n_layers={n}")
        return folder

    async def get_shard_download_status(self, inference_engine_name: str = ""):
        """Nothing to download: local folders are always complete."""
        return
        yield  # an async generator that yields nothing
