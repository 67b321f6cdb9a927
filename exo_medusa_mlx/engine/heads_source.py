"""Where a model's Medusa heads come from, found the way exo finds weights.

For the shard that holds the last layer, in order: the engine's ``heads`` option; the
downloader's own mapping (``LocalShardDownloader.heads_path``); a ``medusa/`` folder inside
the model's folder (or heads files beside its weights); a heads repo named in exo's model
card (``model_cards[model]["medusa"] = "org/repo"``), fetched through the engine's shard
downloader when that is exo's; the heads shipped for the default model. A model with none
decodes plainly and says so once in the log. Other shards need no heads.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from ..core.heads_format import HEADS_FILE, default_heads_for, find_heads
from .downloader import DEFAULT_MODEL_ALIASES, LocalShardDownloader
from .shard import Shard

CARD_KEY = "medusa"  # exo model card field naming a heads repo
HEADS_CARD_SUFFIX = "/medusa"  # the transient card under which exo's downloader fetches it
log = logging.getLogger("exo_medusa_mlx.exo")
_said_plain: set[str] = set()  # models already reported as having no heads


async def shard_heads(engine, shard: Shard, path: Path) -> tuple[Path | None, object]:
    """(heads folder or file, tree spec) for ``engine`` loading ``shard`` from ``path``."""
    if not shard.is_last_layer():
        return None, None
    dl = engine.shard_downloader
    tree = engine.tree
    if tree is None and hasattr(dl, "tree_spec"):
        tree = dl.tree_spec(shard.model_id)
    heads = engine.heads
    if heads is None:
        heads = dl.heads_path(shard.model_id, path) if hasattr(dl, "heads_path") else find_heads(path)
    if heads is None and not isinstance(dl, LocalShardDownloader):
        heads = await card_heads(dl, shard.model_id, engine.engine_name)
    if heads is None and shard.model_id in DEFAULT_MODEL_ALIASES:
        heads = default_heads_for(None)
    if heads is None and shard.model_id not in _said_plain:
        _said_plain.add(shard.model_id)
        log.warning(f"exo-medusa: no Medusa heads for '{shard.model_id}' (none in {path / 'medusa'}, no "
                    f"'{CARD_KEY}' repo in its exo model card): decoding plainly, one token per ring pass")
    return heads, tree


def _model_cards() -> dict | None:
    try:
        cards = getattr(importlib.import_module("exo.models"), "model_cards", None)
    except ImportError:
        return None
    return cards if isinstance(cards, dict) else None


async def card_heads(downloader, model_id: str, engine_name: str) -> Path | None:
    """The heads repo that exo's model card for ``model_id`` names, fetched through ``downloader``.

    exo's downloaders fetch a card's repo for an engine class name, so the heads repo is
    fetched as the one-layer model of a card that exists only while it downloads.
    """
    cards = _model_cards()
    card = cards.get(model_id) if cards is not None else None
    repo = card.get(CARD_KEY) if isinstance(card, dict) else None
    if repo is None:
        return None
    if not isinstance(repo, str) or repo.count("/") != 1:
        raise ValueError(f"exo model card '{model_id}': '{CARD_KEY}' must name a heads repo as 'org/name', "
                         f"got {repo!r}")
    heads_id = model_id + HEADS_CARD_SUFFIX
    cards[heads_id] = {"layers": 1, "repo": {engine_name: repo}}
    try:
        folder = Path(await downloader.ensure_shard(Shard(heads_id, 0, 0, 1), engine_name))
    finally:
        cards.pop(heads_id, None)
    found = find_heads(folder)
    if found is None:
        raise FileNotFoundError(f"heads repo '{repo}' named by exo model card '{model_id}' has no {HEADS_FILE} "
                                f"(fetched to {folder}); fix the card's '{CARD_KEY}' entry")
    return found
