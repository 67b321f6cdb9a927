"""A contiguous range of a model's layers, as exo names it (``end_layer`` inclusive)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Shard:
    """Layers ``start_layer..end_layer`` (both included) of a model with ``n_layers`` layers."""

    model_id: str
    start_layer: int
    end_layer: int
    n_layers: int

    def __post_init__(self):
        for name in ("start_layer", "end_layer", "n_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"shard {name} must be an int, got {type(v).__name__} {v!r}")
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ValueError(f"shard model_id must be a non-empty string, got {self.model_id!r}")
        if self.n_layers < 1:
            raise ValueError(f"shard of '{self.model_id}': n_layers is {self.n_layers}, it must be at least 1")
        if not 0 <= self.start_layer <= self.end_layer < self.n_layers:
            raise ValueError(
                f"shard layers {self.start_layer}-{self.end_layer} of '{self.model_id}' are outside its "
                f"{self.n_layers} layers: need 0 <= start_layer <= end_layer <= {self.n_layers - 1}"
            )

    def is_first_layer(self) -> bool:
        return self.start_layer == 0

    def is_last_layer(self) -> bool:
        return self.end_layer == self.n_layers - 1

    def get_layer_count(self) -> int:
        return self.end_layer - self.start_layer + 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Shard":
        missing = [k for k in ("model_id", "start_layer", "end_layer", "n_layers") if k not in data]
        if missing:
            raise ValueError(f"shard dict is missing {', '.join(missing)}: got keys {sorted(data)}")
        return cls(data["model_id"], data["start_layer"], data["end_layer"], data["n_layers"])

    def overlaps(self, other: "Shard") -> bool:
        return shards_overlap(self, other)


def shards_overlap(a, b) -> bool:
    """Same model and at least one layer in common."""
    return a.model_id == b.model_id and max(a.start_layer, b.start_layer) <= min(a.end_layer, b.end_layer)


def as_shard(shard) -> Shard:
    """Our ``Shard`` from ours, a dict, or any object with the four fields (exo's own ``Shard``)."""
    if isinstance(shard, Shard):
        return shard
    if isinstance(shard, dict):
        return Shard.from_dict(shard)
    try:
        return Shard(shard.model_id, int(shard.start_layer), int(shard.end_layer), int(shard.n_layers))
    except AttributeError:
        raise ValueError(
            f"expected a Shard (model_id, start_layer, end_layer, n_layers), got {type(shard).__name__}"
        ) from None


def partition_layers(n_layers: int, weights: Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous (start, end) layer ranges, inclusive, sized in proportion to ``weights`` (one layer at least)."""
    n = len(weights)
    if n < 1 or n > n_layers:
        raise ValueError(f"cannot split {n_layers} layers over {n} nodes: give 1 to {n_layers} nodes")
    if any(w <= 0 for w in weights):
        raise ValueError(f"partition weights must be positive, got {list(weights)}")
    total, acc, bounds = float(sum(weights)), 0.0, [0]
    for i, w in enumerate(weights[:-1]):
        acc += w
        b = round(n_layers * acc / total)
        bounds.append(min(max(b, bounds[-1] + 1), n_layers - (n - 1 - i)))  # each node keeps a layer
    bounds.append(n_layers)
    return [(a, b - 1) for a, b in zip(bounds[:-1], bounds[1:])]
