"""Checkpoints of head training: saved heads to start from (``--init-from``), and the
checkpoint a run writes every ``--save-every`` steps and ``--resume`` continues from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..heads import MedusaHeads
from ..core.heads_format import DRAFT_KEY, MedusaConfig


def saved_heads(path: str | Path, cfg: MedusaConfig) -> tuple[dict[str, np.ndarray], MedusaConfig]:
    """Read heads to start from (``--init-from``) and check they fit heads of ``cfg``.

    Returns (weights under the reference keys, their config). Run before the data
    is built, so a mismatch costs nothing.
    """
    from ..core.heads_format import read_heads, resolve_config

    weights, raw, file = read_heads(path)
    saved = resolve_config(weights, raw, str(file), cfg.hidden_size, cfg.vocab_size)
    if saved.own_lm_head != cfg.own_lm_head:
        want = "own" if saved.own_lm_head else "shared"
        raise ValueError(f"--init-from {path}: those heads use the {want} lm_head layout; pass --layout {want}")
    if saved.draft_vocab_size:
        weights = {k: v for k, v in weights.items() if k != DRAFT_KEY}  # --draft-vocab makes a new one
    if saved.next_token and not (cfg.next_token or cfg.hydra):
        raise ValueError(f"--init-from {path}: those heads read the next token; pass --next-token (or --hydra)")
    if saved.hydra and not cfg.hydra:
        raise ValueError(f"--init-from {path}: those heads are hydra heads; pass --hydra")
    if saved.num_layers > cfg.num_layers:
        raise ValueError(f"--init-from {path}: those heads have {saved.num_layers} layers; pass --num-layers "
                         f"{saved.num_layers} or more")
    return weights, saved


def init_from(heads: MedusaHeads, weights: dict[str, np.ndarray], saved: MedusaConfig) -> None:
    """Start ``heads`` from saved ones (fine-tuning), as read by ``saved_heads``.

    The saved heads fill the first heads and blocks; a block beyond the saved depth
    starts as the identity (W = 0, b = 0: x + SiLU(0) = x), so deeper heads begin
    exactly where the saved ones were; so do next-token and hydra path maps that the
    saved heads lack (zero: the tokens are ignored at first). A hydra head's map of the
    root starts from a next-token head's map. Extra heads keep their fresh weights.
    """
    merged = heads.reference_weights()
    n = heads.config.num_layers
    for i in range(min(saved.num_heads, heads.num_heads)):
        for part in ("weight", "bias") if heads.config.next_token else ():
            key = f"{i}.next_token.{part}"
            merged[key] = weights[key] if saved.next_token else np.zeros_like(merged[key])
        for j in range(i + 1 if heads.config.hydra else 0):
            for part in ("weight", "bias"):
                key, root = f"{i}.path.{j}.{part}", f"{i}.next_token.{part}"
                merged[key] = (weights[key] if saved.hydra else weights[root] if saved.next_token and j == 0
                               else np.zeros_like(merged[key]))
        for j in range(n):
            for part in ("weight", "bias"):
                key = f"{i}.{j}.linear.{part}"
                merged[key] = weights[key] if j < saved.num_layers else np.zeros_like(merged[key])
        if heads.config.own_lm_head:
            merged[f"{i}.{n}.weight"] = weights[f"{i}.{saved.num_layers}.weight"]
    heads.load_reference_weights(merged)
    mx.eval(heads.parameters())


def save_checkpoint(folder: Path, heads: MedusaHeads, opt, step: int) -> None:
    """Heads, optimizer state and step, swapped in whole: an interrupted save keeps the previous checkpoint."""
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    heads.save(tmp)
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(opt.state)))
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    if folder.exists():
        folder.replace(old)
    tmp.replace(folder)
    shutil.rmtree(old, ignore_errors=True)


def resume_step(checkpoint: Path, heads: MedusaHeads) -> int:
    """Load the checkpoint's heads into ``heads`` (same layout required); return its step."""
    from ..core.heads_format import layout_from_keys, read_heads

    weights, _, file = read_heads(checkpoint)
    saved = layout_from_keys(weights, str(file))
    cfg = heads.config
    want = (heads.num_heads, cfg.num_layers, cfg.own_lm_head, cfg.next_token, cfg.hydra)
    if saved != want:
        raise ValueError(f"--resume: {checkpoint} holds heads of another layout (heads, layers, own lm_head, "
                         f"next-token, hydra = {saved}, asked {want}): pass the same flags, or another --output")
    heads.load_reference_weights(weights)
    try:
        return int(json.loads((checkpoint / "state.json").read_text())["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--resume: {checkpoint / 'state.json'} is unreadable ({e}): delete the checkpoint "
                         "folder to start over") from None


def resume_from(checkpoint: Path | None, heads: MedusaHeads, opt, log=print) -> int:
    """``--resume``: load the checkpoint's heads and optimizer state; return its step."""
    if checkpoint is None or not (checkpoint / "state.json").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {checkpoint} (it is written every --save-every steps)")
    start = resume_step(checkpoint, heads)
    opt.init(heads.trainable_parameters())
    opt.state = tree_unflatten(list(mx.load(str(checkpoint / "optimizer.safetensors")).items()))
    log(f"resumed from {checkpoint} at step {start}")
    return start
