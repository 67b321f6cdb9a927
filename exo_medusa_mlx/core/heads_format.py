"""Medusa head checkpoints: config and key layout, framework-neutral.

The reference layout (``medusa_lm_head.safetensors`` / ``.pt``) names head i's
block j ``{i}.{j}.linear.weight`` / ``.bias`` and its own vocabulary projection
``{i}.{n}.weight`` (n = layers per head). Heads that reuse the base lm_head
(the later, smaller layout) simply have no ``{i}.{n}.weight``. This project
writes the same keys, so its heads load in the reference code and vice versa.

One extension: heads that also read the base model's next token (its argmax at
the same position, known before the heads run) carry ``{i}.next_token.weight`` /
``.bias``, a linear map of that token's embedding added to the hidden state
before the blocks. The reference code cannot run these. Heads may also carry a
draft vocabulary, ``draft_vocab`` (int32 token ids): their guesses are then scored
over those tokens only, a cheaper pass over a slice of lm_head.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

HEADS_FILE = "medusa_lm_head.safetensors"
HEADS_PT_FILE = "medusa_lm_head.pt"
CONFIG_FILE = "config.json"

# Heads trained for the default model, used when no --heads is given for it.
SHIPPED_HEADS = Path(__file__).resolve().parent.parent / "shipped" / "smollm2-135m-instruct"

_KEY = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")
_NEXT_KEY = re.compile(r"^(\d+)\.next_token\.(weight|bias)$")
_PATH_KEY = re.compile(r"^(\d+)\.path\.(\d+)\.(weight|bias)$")
DRAFT_KEY = "draft_vocab"


@dataclass
class MedusaConfig:
    num_heads: int
    hidden_size: int
    vocab_size: int
    num_layers: int = 1
    own_lm_head: bool = False  # v1 layout: each head has its own vocab projection
    next_token: bool = False  # heads also read the embedding of the base model's next token
    hydra: bool = False  # head d also reads the embeddings of the d+1 tokens on the path it extends
    draft_vocab_size: int = 0  # >0: guesses are scored over this many tokens (``draft_vocab``)
    base_model: str | None = None
    info: dict = field(default_factory=dict)  # training facts, accuracies

    @property
    def layout(self) -> str:
        """"medusa" (independent heads), "next-token" (each reads the root) or "hydra" (each reads its path)."""
        return "hydra" if self.hydra else "next-token" if self.next_token else "medusa"

    @property
    def candidates(self) -> int:
        """How many tokens each head chooses among: its draft vocabulary, else the whole vocabulary."""
        return self.draft_vocab_size or self.vocab_size

    @classmethod
    def from_dict(cls, d: dict) -> "MedusaConfig":
        names = {f.name for f in fields(cls)}
        d = dict(d)
        # Reference names.
        d.setdefault("num_heads", d.get("medusa_num_heads"))
        d.setdefault("num_layers", d.get("medusa_num_layers", 1))
        d.setdefault("base_model", d.get("base_model_name_or_path"))
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layout"] = self.layout
        # Reference names too, so the reference code can read our config.
        d.update(
            medusa_num_heads=self.num_heads,
            medusa_num_layers=self.num_layers,
            base_model_name_or_path=self.base_model,
        )
        return d


def module_keys(cfg: MedusaConfig) -> dict[str, str]:
    """Reference checkpoint key -> parameter name in our heads modules (both backends name them alike)."""
    keys = {}
    for i in range(cfg.num_heads):
        if cfg.next_token:
            for part in ("weight", "bias"):
                keys[f"{i}.next_token.{part}"] = f"heads.{i}.next_token.{part}"
        for j in range(i + 1 if cfg.hydra else 0):  # head i reads the root and the i tokens after it
            for part in ("weight", "bias"):
                keys[f"{i}.path.{j}.{part}"] = f"heads.{i}.path.{j}.{part}"
        for j in range(cfg.num_layers):
            for part in ("weight", "bias"):
                keys[f"{i}.{j}.linear.{part}"] = f"heads.{i}.blocks.{j}.linear.{part}"
        if cfg.own_lm_head:
            keys[f"{i}.{cfg.num_layers}.weight"] = f"heads.{i}.lm_head.weight"
    return keys


def layout_from_keys(weights: dict[str, Any], source: str) -> tuple[int, int, bool, bool, bool]:
    """(num_heads, num_layers, own_lm_head, next_token, hydra) counted from the keys, not the config."""
    blocks: dict[int, set[int]] = {}
    heads_with_proj = set()
    heads_with_next = set()
    paths: dict[int, set[int]] = {}
    for k in weights:
        if k == DRAFT_KEY:
            continue
        m = _KEY.match(k)
        if m is None and _NEXT_KEY.match(k):
            heads_with_next.add(int(_NEXT_KEY.match(k)[1]))
            continue
        if m is None and _PATH_KEY.match(k):
            paths.setdefault(int(_PATH_KEY.match(k)[1]), set()).add(int(_PATH_KEY.match(k)[2]))
            continue
        if m is None:
            raise ValueError(f"{source}: unexpected tensor '{k}'; expected Medusa keys like '0.0.linear.weight'")
        i, j, kind = int(m[1]), int(m[2]), m[3]
        if kind == "weight":
            heads_with_proj.add((i, j))
        else:
            blocks.setdefault(i, set()).add(j)
    if not blocks:
        raise ValueError(f"{source}: holds no Medusa blocks ('{{i}}.{{j}}.linear.weight')")
    num_heads = max(blocks) + 1
    num_layers = max(max(js) for js in blocks.values()) + 1
    for i in range(num_heads):
        for j in range(num_layers):
            for part in ("weight", "bias"):
                if f"{i}.{j}.linear.{part}" not in weights:
                    raise ValueError(f"{source}: missing tensor '{i}.{j}.linear.{part}'")
    for i, j in heads_with_proj:
        if j != num_layers:
            raise ValueError(f"{source}: tensor '{i}.{j}.weight' does not follow the {num_layers} blocks of head {i}")
    own = bool(heads_with_proj)
    if own and len(heads_with_proj) != num_heads:
        missing = sorted(set(range(num_heads)) - {i for i, _ in heads_with_proj})
        raise ValueError(f"{source}: missing tensor '{missing[0]}.{num_layers}.weight' (some heads have their own lm_head, this one has none)")
    next_token = bool(heads_with_next)
    for i in range(num_heads) if next_token else ():
        for part in ("weight", "bias"):
            if f"{i}.next_token.{part}" not in weights:
                raise ValueError(f"{source}: missing tensor '{i}.next_token.{part}' (other heads read the next token)")
    if heads_with_next - set(range(num_heads)):
        raise ValueError(f"{source}: tensor '{max(heads_with_next)}.next_token.weight' belongs to no head")
    hydra = _check_paths(weights, paths, num_heads, next_token, source)
    return num_heads, num_layers, own, next_token, hydra


def _check_paths(weights, paths: dict[int, set[int]], num_heads: int, next_token: bool, source: str) -> bool:
    """Hydra heads: head i holds ``{i}.path.{j}`` for j in 0..i (the root and the i tokens after it)."""
    if not paths:
        return False
    if next_token:
        raise ValueError(f"{source}: holds both next-token and hydra ('{{i}}.path.{{j}}') tensors; one layout per file")
    for i in range(num_heads):
        for j in range(i + 1):
            for part in ("weight", "bias"):
                if f"{i}.path.{j}.{part}" not in weights:
                    raise ValueError(f"{source}: missing tensor '{i}.path.{j}.{part}' (hydra head {i} reads "
                                     f"{i + 1} path tokens)")
    extra = [(i, j) for i, js in paths.items() for j in js if i >= num_heads or j > i]
    if extra:
        raise ValueError(f"{source}: tensor '{extra[0][0]}.path.{extra[0][1]}.weight' belongs to no head's path")
    return True


def check_shapes(weights: dict[str, Any], cfg: MedusaConfig, source: str) -> None:
    H, V = cfg.hidden_size, cfg.vocab_size
    draft = weights.get(DRAFT_KEY)
    if draft is not None:
        if cfg.own_lm_head:
            raise ValueError(f"{source}: a draft vocabulary needs heads that share the base lm_head")
        if draft.ndim != 1 or len(draft) == 0 or len(np.unique(draft)) != len(draft) \
                or draft.min() < 0 or draft.max() >= V:
            raise ValueError(f"{source}: tensor '{DRAFT_KEY}' must list distinct token ids below {V}; "
                             "these heads were made for another vocabulary")
    for k, w in weights.items():
        shape = tuple(w.shape)
        if k == DRAFT_KEY:
            continue
        if k.endswith("bias"):
            want = (H,)
        elif k.endswith("linear.weight") or _NEXT_KEY.match(k) or _PATH_KEY.match(k):
            want = (H, H)
        else:
            want = (V, H)
        if shape != want:
            raise ValueError(
                f"{source}: tensor '{k}' has shape {shape}, the base model needs {want} "
                f"(hidden size {H}, vocab {V}); these heads were trained for another model"
            )


def read_heads(path: str | Path) -> tuple[dict[str, np.ndarray], dict, Path]:
    """Read head weights (numpy, float32) and the raw config dict from a file or folder."""
    path = Path(path)
    if path.is_dir():
        for name in (HEADS_FILE, HEADS_PT_FILE):
            if (path / name).is_file():
                folder, file = path, path / name
                break
        else:
            raise FileNotFoundError(f"no {HEADS_FILE} or {HEADS_PT_FILE} in {path}")
    elif path.is_file():
        folder, file = path.parent, path
    else:
        raise FileNotFoundError(f"Medusa heads {path} not found; pass --heads PATH to a heads folder or file")
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            weights = load_file(str(file))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    elif file.suffix in (".pt", ".bin"):
        try:
            import torch
        except ImportError:
            raise ValueError(f"{file}: reading .pt heads needs torch (pip install 'exo-medusa-mlx[torch]')") from None
        import pickle  # only for its error type: torch.load(weights_only=True) unpickles nothing else

        try:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
            raise ValueError(f"{file}: not a readable torch state dict ({str(e).splitlines()[0]})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{file}: not a state dict of tensors; save the heads with torch.save(heads.state_dict())")
        weights = {k: v.numpy() if k == DRAFT_KEY else v.float().numpy() for k, v in state.items()}
    else:
        raise ValueError(f"{file}: unknown heads format; expected .safetensors or .pt")
    weights = {k: np.asarray(v, dtype=np.int64 if k == DRAFT_KEY else np.float32) for k, v in weights.items()}
    cfg_path = folder / CONFIG_FILE
    raw = {}
    if cfg_path.is_file():
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{cfg_path}: expected a JSON object of head settings, got {type(raw).__name__}")
    return weights, raw, file


def resolve_config(weights: dict, raw: dict, source: str, hidden_size: int, vocab_size: int) -> MedusaConfig:
    num_heads, num_layers, own, next_token, hydra = layout_from_keys(weights, source)
    cfg = MedusaConfig.from_dict({**raw, "hidden_size": hidden_size, "vocab_size": vocab_size})
    # Published configs lie about the head count: the keys decide.
    cfg.num_heads, cfg.num_layers, cfg.own_lm_head, cfg.next_token, cfg.hydra = num_heads, num_layers, own, next_token, hydra
    cfg.draft_vocab_size = len(weights[DRAFT_KEY]) if DRAFT_KEY in weights else 0
    check_shapes(weights, cfg, source)
    return cfg


def write_heads(folder: str | Path, weights: dict[str, np.ndarray], cfg: MedusaConfig) -> Path:
    """Write heads (reference keys) and config atomically into ``folder``; never weights that are
    not finite (a diverged training run)."""
    from safetensors.numpy import save_file

    bad = [k for k, v in weights.items() if k != DRAFT_KEY and not np.isfinite(v).all()]
    if bad:
        raise ValueError(f"heads weights {', '.join(sorted(bad)[:3])}{' ...' if len(bad) > 3 else ''} hold NaN or "
                         f"infinite values (did training diverge?): not writing {folder}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (HEADS_FILE + ".tmp")
    save_file({k: np.ascontiguousarray(v, dtype=np.int32 if k == DRAFT_KEY else np.float32)
               for k, v in weights.items()}, str(tmp),
              metadata={"format": "medusa", "num_heads": str(cfg.num_heads)})
    ctmp = folder / (CONFIG_FILE + ".tmp")
    ctmp.write_text(json.dumps(cfg.to_dict(), indent=1))
    tmp.replace(folder / HEADS_FILE)
    ctmp.replace(folder / CONFIG_FILE)
    return folder


def find_heads(folder: Path) -> Path | None:
    """Medusa heads that come with a model folder: ``folder/medusa/`` or heads files in ``folder``."""
    for cand in (folder / "medusa", folder):
        if (cand / HEADS_FILE).is_file() or (cand / HEADS_PT_FILE).is_file():
            return cand
    return None


def default_heads_for(model: str | None) -> Path | None:
    """The heads a model comes with: those shipped in the package for the default model
    (``model is None``), or those in a local model folder (``find_heads``)."""
    if model is None:
        return SHIPPED_HEADS if (SHIPPED_HEADS / HEADS_FILE).is_file() else None
    folder = Path(model).expanduser()
    return find_heads(folder) if folder.is_dir() else None


def default_tree_for(heads_path: Path | None, backend: str = "mlx", ring: bool = False) -> str | Path:
    """The tree tuned with the heads: ``tree[.ring][.<backend>].json`` beside them, the most
    specific first (``tree.ring.*``: tuned for a ring's per-pass cost, read by ring nodes;
    ``.<backend>``: the backends' latency curves differ), else the CPU default."""
    from .tree import DEFAULT_TREE

    if heads_path is not None:
        folder = heads_path if heads_path.is_dir() else heads_path.parent
        kinds = ["ring.", ""] if ring else [""]
        backends = [f"{backend}.", ""] if backend != "mlx" else [""]
        for name in (f"tree.{k}{b}json" for k in kinds for b in backends):
            if (folder / name).is_file():
                return folder / name
    return DEFAULT_TREE
