"""A ``medusa`` field in exo 1.x's model cards: the heads a model's runner uses.

exo's card schema forbids unknown fields (a card with one is skipped), so ``install()``
has exo's card loader drop the field (``load_card_without_medusa``), and a runner reads it
from the card file itself (``card_entry``). The field names a heads folder: a path, or
an ``org/name`` under exo's models folders (where exo downloads ``org--name``).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Iterable

CARD_KEY = "medusa"


def card_entry(model_id: str, card_dirs: Iterable[Path]) -> tuple[str | None, Path | None]:
    """(the ``medusa`` entry of ``model_id``'s card, that card's file); Nones where no card has one."""
    for folder in card_dirs:
        for toml_file in sorted(Path(folder).rglob("*.toml")) if Path(folder).is_dir() else ():
            text = toml_file.read_text(errors="replace")
            if CARD_KEY not in text or model_id not in text:  # most cards: no parsing
                continue
            try:
                card = tomllib.loads(text)
            except tomllib.TOMLDecodeError:
                continue  # exo skips such a card too, with its own warning
            if card.get("model_id") == model_id and CARD_KEY in card:
                entry = card[CARD_KEY]
                if not isinstance(entry, str) or not entry:
                    raise ValueError(f"model card {toml_file}: '{CARD_KEY}' must name a heads folder (a path, or "
                                     f"org/name under exo's models folder), got {entry!r}")
                return entry, toml_file
    return None, None


def resolve_entry(entry: str, models_dirs: Iterable[Path]) -> Path | None:
    """The folder a card's entry names: a path, else ``org/name`` as exo stores it (``org--name``)."""
    path = Path(entry).expanduser()
    if path.is_absolute() or entry.startswith("."):
        return path if path.exists() else None
    for d in models_dirs:
        for cand in (Path(d) / entry.replace("/", "--"), Path(d) / entry):
            if cand.exists():
                return cand
    return None


def load_card_without_medusa(model_card_cls):
    """exo's ``ModelCard.load_from_path``, dropping our field before exo's schema sees it."""
    import tomlkit
    from anyio import open_file

    async def load_from_path(path):
        async with await open_file(path, "r") as f:
            card = tomlkit.loads(await f.read())
        card.pop(CARD_KEY, None)
        return model_card_cls.model_validate(card)

    return load_from_path
