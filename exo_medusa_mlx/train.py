"""``mlx_medusa train``: Medusa-1 heads on a frozen base model, in MLX.

The data is the base model's own: its responses to a prompt set (generated in
batches, greedy by default), or a text/JSONL file relabelled with its
predictions. The frozen model runs once; its last hidden states and its own
next-token choices go to shards on disk, and the heads train on those shards.
The base lm_head stays in the loss, so the heads learn in its vocabulary space.

Targets: a row is one position t with hidden state h_t and the base model's
argmax there, label_t (the token at t+1 for greedy data). Head i at t predicts
the token at t+2+i, so its target is label_{t+1+i}, weighted 0.8^i.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from tqdm.auto import tqdm

from .distill import (  # noqa: F401  (the data half, re-exported for train's users)
    DATA_DIR,
    DEFAULT_PROMPTS,
    build_cache,
    cache_key,
    chat_ids,
    eos_ids,
    iterate_batches,
    load_shard,
    read_documents,
    read_prompts,
)
from .heads import MedusaHeads
from .core.heads_format import DRAFT_KEY, MedusaConfig

HEAD_DECAY = 0.8  # head i's loss weight is HEAD_DECAY ** i
def head_logits(heads: MedusaHeads, lm_head, h: mx.array, next_embeds: mx.array | None = None,
                draft=None) -> mx.array:
    """(K, B, V) logits of every head at hidden states h: (B, H); ``draft``: (ids, rows), see
    ``MedusaHeads.project``."""
    return heads.project(h, lm_head, base=False, next_embeds=next_embeds, draft=draft)


def next_embeds(heads: MedusaHeads, embed, batch: dict) -> mx.array | None:
    """Embeddings of the tokens fed after the batch's rows, for next-token heads (else None)."""
    if not heads.config.next_token:
        return None
    if embed is None:
        raise ValueError("next-token heads need the base model's embedding (embed=)")
    return embed(mx.array(batch["next"]))


def loss_fn(heads: MedusaHeads, lm_head, h, targets, teacher_ids=None, teacher_probs=None, next_embeds=None):
    """Weighted CE (or top-k KL to the base model) summed over heads; also per-head loss and top-1.

    targets: (B, K) with -1 where the sequence ends; teacher_*: (B, K, k); next_embeds:
    (B, H), the fed tokens' embeddings, for next-token heads.
    """
    logits = head_logits(heads, lm_head, h, next_embeds).astype(mx.float32)  # (K, B, V)
    t = targets.T  # (K, B)
    valid = (t >= 0).astype(mx.float32)
    lse = mx.logsumexp(logits, axis=-1)
    if teacher_ids is None:
        picked = mx.take_along_axis(logits, mx.maximum(t, 0)[..., None], axis=-1)[..., 0]
    else:
        tid, tp = teacher_ids.transpose(1, 0, 2), teacher_probs.transpose(1, 0, 2)  # (K, B, k)
        tp = tp / tp.sum(-1, keepdims=True)
        picked = (mx.take_along_axis(logits, tid, axis=-1) * tp).sum(-1)
    per_head = ((lse - picked) * valid).sum(-1) / mx.maximum(valid.sum(-1), 1.0)  # (K,)
    weights = HEAD_DECAY ** mx.arange(per_head.shape[0], dtype=mx.float32)
    top1 = ((mx.argmax(logits, axis=-1) == t) * valid).sum(-1) / mx.maximum(valid.sum(-1), 1.0)
    return (weights * per_head).sum(), (per_head, top1)


def target_ranks(heads: MedusaHeads, lm_head, h: mx.array, targets: mx.array,
                 next_embeds: mx.array | None = None, draft=None) -> mx.array:
    """Rank of each target among its head's logits (0 = top-1; -1 where no target). (B, K)."""
    logits = head_logits(heads, lm_head, h, next_embeds, draft).astype(mx.float32)  # (K, B, V)
    t = targets.T
    tl = mx.take_along_axis(logits, mx.maximum(t, 0)[..., None], axis=-1)
    rank = mx.where(tl[..., 0] > -mx.inf, (logits > tl).sum(-1), logits.shape[-1])  # outside a draft: never
    return mx.where(t >= 0, rank, -1).T


def evaluate(heads, lm_head, folder: Path, files: list[str], batch_size: int, topk=(1, 5), embed=None,
             draft=None) -> dict:
    """Per-head top-k accuracies on a split."""
    hits = np.zeros((heads.num_heads, max(topk)))
    counts = np.zeros(heads.num_heads)
    for b in iterate_batches(folder, files, heads.num_heads, batch_size):
        r = target_ranks(heads, lm_head, mx.array(b["hidden"], dtype=mx.float32), mx.array(b["targets"]),
                         next_embeds(heads, embed, b), draft)
        r = np.array(r)
        for k in range(max(topk)):
            hits[:, k] += ((r >= 0) & (r <= k)).sum(0)
        counts += (r >= 0).sum(0)
    acc = hits / np.maximum(counts, 1)[:, None]
    return {f"top{k}": [round(float(a), 4) for a in acc[:, k - 1]] for k in topk} | {"rows": int(counts[0])}


# --------------------------------------------------------------------------- training


def check_draft_size(size: int, vocab_size: int) -> None:
    if not 1 <= size < vocab_size:
        raise ValueError(f"--draft-vocab {size} must be in 1..{vocab_size - 1} (0: the whole vocabulary)")


def draft_vocabulary(folder: Path, files: list[str], size: int, vocab_size: int) -> np.ndarray:
    """The ``size`` tokens the base model emits most often in the shards (ties: lower ids,
    which byte-pair vocabularies give to more frequent pieces), in id order."""
    from safetensors.numpy import load_file

    check_draft_size(size, vocab_size)
    counts = np.zeros(vocab_size, np.int64)
    for f in files:
        counts += np.bincount(load_file(str(folder / f))["labels"], minlength=vocab_size)[:vocab_size]
    order = np.lexsort((np.arange(vocab_size), -counts))  # by count, then by id
    return np.sort(order[:size]).astype(np.int64)


def make_schedule(lr: float, steps: int, warmup: int):
    warmup = min(warmup, max(steps - 1, 0))
    cosine = optim.cosine_decay(lr, max(steps - warmup, 1), end=lr * 0.05)
    if warmup == 0:
        return cosine
    return optim.join_schedules([optim.linear_schedule(lr * 0.01, lr, warmup), cosine], [warmup])


def new_heads(cfg: MedusaConfig, lm_head_weight: mx.array | None, seed: int) -> MedusaHeads:
    mx.random.seed(seed)
    heads = MedusaHeads(cfg)
    if cfg.own_lm_head:  # the reference starts each head's projection from the base lm_head
        for head in heads.heads:
            head.lm_head.weight = mx.array(lm_head_weight)
    mx.eval(heads.parameters())
    return heads


def saved_heads(path: str | Path, cfg: MedusaConfig) -> tuple[dict[str, np.ndarray], MedusaConfig]:
    """Read heads to start from (``--init-from``) and check they fit heads of ``cfg``.

    Returns (weights under the reference keys, their config). Run before the data
    is built, so a mismatch costs nothing.
    """
    from .core.heads_format import read_heads, resolve_config

    weights, raw, file = read_heads(path)
    saved = resolve_config(weights, raw, str(file), cfg.hidden_size, cfg.vocab_size)
    if saved.own_lm_head != cfg.own_lm_head:
        want = "own" if saved.own_lm_head else "shared"
        raise ValueError(f"--init-from {path}: those heads use the {want} lm_head layout; pass --layout {want}")
    if saved.draft_vocab_size:
        weights = {k: v for k, v in weights.items() if k != DRAFT_KEY}  # --draft-vocab makes a new one
    if saved.next_token and not cfg.next_token:
        raise ValueError(f"--init-from {path}: those heads read the next token; pass --next-token")
    if saved.num_layers > cfg.num_layers:
        raise ValueError(f"--init-from {path}: those heads have {saved.num_layers} layers; pass --num-layers "
                         f"{saved.num_layers} or more")
    return weights, saved


def init_from(heads: MedusaHeads, weights: dict[str, np.ndarray], saved: MedusaConfig) -> None:
    """Start ``heads`` from saved ones (fine-tuning), as read by ``saved_heads``.

    The saved heads fill the first heads and blocks; a block beyond the saved depth
    starts as the identity (W = 0, b = 0: x + SiLU(0) = x), so deeper heads begin
    exactly where the saved ones were; so do next-token maps that plain saved heads
    lack (zero: the token is ignored at first). Extra heads keep their fresh weights.
    """
    merged = heads.reference_weights()
    n = heads.config.num_layers
    for i in range(min(saved.num_heads, heads.num_heads)):
        for part in ("weight", "bias") if heads.config.next_token else ():
            key = f"{i}.next_token.{part}"
            merged[key] = weights[key] if saved.next_token else np.zeros_like(merged[key])
        for j in range(n):
            for part in ("weight", "bias"):
                key = f"{i}.{j}.linear.{part}"
                merged[key] = weights[key] if j < saved.num_layers else np.zeros_like(merged[key])
        if heads.config.own_lm_head:
            merged[f"{i}.{n}.weight"] = weights[f"{i}.{saved.num_layers}.weight"]
    heads.load_reference_weights(merged)
    mx.eval(heads.parameters())


def _save_checkpoint(folder: Path, heads: MedusaHeads, opt, step: int) -> None:
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


def _resume_step(checkpoint: Path, heads: MedusaHeads) -> int:
    """Load the checkpoint's heads into ``heads`` (same layout required); return its step."""
    from .core.heads_format import layout_from_keys, read_heads

    weights, _, file = read_heads(checkpoint)
    saved = layout_from_keys(weights, str(file))
    want = (heads.num_heads, heads.config.num_layers, heads.config.own_lm_head, heads.config.next_token)
    if saved != want:
        raise ValueError(f"--resume: {checkpoint} holds heads of another layout (heads, layers, own lm_head, "
                         f"next-token = {saved}, asked {want}): pass the same flags, or another --output")
    heads.load_reference_weights(weights)
    try:
        return int(json.loads((checkpoint / "state.json").read_text())["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--resume: {checkpoint / 'state.json'} is unreadable ({e}): delete the checkpoint "
                         "folder to start over") from None


def steps_per_epoch(meta: dict, batch_size: int) -> int:
    # A sequence's last row has no head target and is dropped by load_shard.
    usable = meta["rows"]["train"] - meta["sequences"]["train"]
    return max(usable // batch_size, 1)


def train(heads: MedusaHeads, lm_head, cache_dir: Path, meta: dict, *, steps: int, batch_size: int, lr: float,
          warmup: int, loss: str = "ce", seed: int = 0, eval_every: int = 0, save_every: int = 0,
          checkpoint: Path | None = None, resume: bool = False, weight_decay: float = 0.0, noise: float = 0.0,
          embed=None, log=print) -> dict:
    """Train ``heads`` in place on the cached train split; returns the last val metrics (if any).

    ``noise``: Gaussian noise added to the input hidden states, as a fraction of
    their RMS (a regulariser: the heads see each cached state once per epoch).
    ``embed``: the base model's token embedding, which next-token heads read.
    """
    train_files = [f["file"] for f in meta["splits"]["train"]]
    val_files = [f["file"] for f in meta["splits"]["val"]]
    if not train_files:
        raise ValueError(f"{cache_dir}: no training rows (all data went to --val-split?)")
    usable = meta["rows"]["train"] - meta["sequences"]["train"]
    if usable < batch_size:
        raise ValueError(f"{cache_dir}: {usable} training rows, fewer than --batch-size {batch_size}: "
                         "lower --batch-size or add data")
    per_epoch = steps_per_epoch(meta, batch_size)
    opt = optim.AdamW(learning_rate=make_schedule(lr, steps, warmup), weight_decay=weight_decay)
    start = 0
    if resume and (checkpoint is None or not (checkpoint / "state.json").is_file()):
        raise FileNotFoundError(f"--resume: no checkpoint in {checkpoint} (it is written every --save-every steps)")
    if resume:
        start = _resume_step(checkpoint, heads)
        opt.init(heads.trainable_parameters())
        opt.state = tree_unflatten(list(mx.load(str(checkpoint / "optimizer.safetensors")).items()))
        log(f"resumed from {checkpoint} at step {start}")
    step_fn = nn.value_and_grad(heads, loss_fn)
    mx.random.seed(seed + start)

    def update(b):
        h = mx.array(b["hidden"], dtype=mx.float32)
        if noise > 0:
            rms = mx.sqrt(mx.mean(h * h, axis=-1, keepdims=True))
            h = h + noise * rms * mx.random.normal(h.shape)
        teacher = [mx.array(b["teacher_ids"]), mx.array(b["teacher_probs"])] if loss == "kl" else [None, None]
        (value, (per_head, top1)), grads = step_fn(heads, lm_head, h, mx.array(b["targets"]), *teacher,
                                                   next_embeds(heads, embed, b))
        opt.update(heads, grads)
        mx.eval(heads.parameters(), opt.state, value, per_head, top1)
        return float(value), np.array(per_head), np.array(top1)

    metrics: dict = {}
    smooth = None
    bar = tqdm(total=steps, initial=start, desc="train", unit="step")
    step = start
    epoch = start // per_epoch
    while step < steps:
        batches = iterate_batches(cache_dir, train_files, heads.num_heads, batch_size,
                                  np.random.default_rng([seed, epoch]))
        for _ in range(step - epoch * per_epoch):  # resuming mid-epoch: skip what was seen
            next(batches, None)
        for b in batches:
            value, per_head, top1 = update(b)
            smooth = np.stack([per_head, top1]) if smooth is None else 0.9 * smooth + 0.1 * np.stack([per_head, top1])
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", acc="/".join(f"{a:.2f}" for a in smooth[1]),
                            lr=f"{float(opt.learning_rate):.1e}")
            if val_files and eval_every and step % eval_every == 0 and step < steps:
                metrics = evaluate(heads, lm_head, cache_dir, val_files, batch_size, embed=embed)
                bar.write(f"step {step}: val top-1 {metrics['top1']}, top-5 {metrics['top5']}")
            if checkpoint is not None and save_every and step % save_every == 0:
                _save_checkpoint(checkpoint, heads, opt, step)
            if step >= steps or step - epoch * per_epoch >= per_epoch:
                break
        epoch += 1
    bar.close()
    if checkpoint is not None and save_every:
        _save_checkpoint(checkpoint, heads, opt, step)
    metrics = evaluate(heads, lm_head, cache_dir, val_files, batch_size, embed=embed) if val_files else {}
    metrics["train_loss_per_head"] = [round(float(x), 4) for x in smooth[0]] if smooth is not None else None
    metrics["train_top1_per_head"] = [round(float(x), 4) for x in smooth[1]] if smooth is not None else None
    return metrics


# --------------------------------------------------------------------------- CLI


def load_base(model: str | None):
    """The frozen base model (float32 on CPU), its lm_head, tokenizer and id."""
    from mlx_lm.utils import load as mlx_load

    from .default_model import DEFAULT_MODEL_ID, resolve_model_path
    from .model import base_lm_head

    base, tokenizer = mlx_load(str(resolve_model_path(model)))
    if mx.default_device() == mx.cpu:
        base.set_dtype(mx.float32)
    base.freeze()
    return base, base_lm_head(base), tokenizer, model or DEFAULT_MODEL_ID


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx_medusa train", allow_abbrev=False, description="Train Medusa heads (Medusa-1: frozen base) in MLX.")
    p.add_argument("--model", default=None, help="Base model folder or repo id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--output", "-o", required=True, help="Folder for the heads (medusa_lm_head.safetensors + config.json)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", default=None, help=f"Prompts to self-distil (JSON list or JSONL; default {DEFAULT_PROMPTS.name})")
    src.add_argument("--data", default=None, help="Text or JSONL file, relabelled with the base model's predictions")
    p.add_argument("--num-prompts", type=int, default=None, help="Use only the first N prompts/documents")
    p.add_argument("--max-tokens", type=int, default=160, help="Response length for self-distillation")
    p.add_argument("--temp", type=float, default=0.0, help="Sampling temperature of the self-distilled responses")
    p.add_argument("--samples-per-prompt", type=int, default=1,
                   help="Responses per prompt: the first greedy, the others sampled at --temp (> 0)")
    p.add_argument("--gen-batch-size", type=int, default=32, help="Sequences per batch in the frozen model's pass")
    p.add_argument("--seq-len", type=int, default=512, help="Cut --data documents to this many tokens")
    p.add_argument("--cache-dir", default=None, help="Hidden-state shards (default: OUTPUT/cache); reused when the data matches")
    p.add_argument("--val-split", type=float, default=0.05, help="Fraction of sequences held out for validation")
    p.add_argument("--data-only", action="store_true", help="Build the hidden-state cache and stop")
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=1, help="ResBlocks per head")
    p.add_argument("--layout", choices=["shared", "own"], default="shared",
                   help="shared: heads reuse the base lm_head (small); own: each head has its own")
    p.add_argument("--next-token", action="store_true",
                   help="Heads also read the embedding of the base model's next token (its argmax, known before "
                        "the heads run); costs a second pass over lm_head per step, not the reference layout")
    p.add_argument("--draft-vocab", type=int, default=0,
                   help="Score the heads' guesses over the N tokens the model emits most in the data (a cheaper "
                        "pass over part of lm_head; pays with --next-token on a CPU); 0: the whole vocabulary")
    p.add_argument("--loss", choices=["ce", "kl"], default="ce", help="CE to the base argmax, or KL to its top-k distribution")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--noise", type=float, default=0.0, help="Gaussian noise on the input states, as a fraction of their RMS")
    p.add_argument("--warmup", type=int, default=None, help="Warm-up steps (default 5%% of the steps)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--iters", type=int, default=None, help="Optimizer steps")
    g.add_argument("--epochs", type=float, default=None, help="Passes over the training rows (default 1)")
    p.add_argument("--batch-size", type=int, default=32, help="Rows (positions) per step")
    p.add_argument("--steps-per-eval", type=int, default=0, help="Validate every N steps (0: at the end only)")
    p.add_argument("--save-every", type=int, default=100, help="Checkpoint every N steps into OUTPUT/checkpoint")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="Continue from OUTPUT/checkpoint")
    start.add_argument("--init-from", default=None,
                       help="Start from saved heads (fine-tune); with a larger --num-layers the new blocks start as the identity")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


def run(args) -> dict:
    for name in ("num_heads", "num_layers", "batch_size", "max_tokens", "gen_batch_size", "seq_len", "iters"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("warmup", "steps_per_eval", "save_every", "weight_decay", "noise"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative")
    if args.epochs is not None and args.epochs <= 0:
        raise ValueError(f"--epochs {args.epochs} must be positive")
    if args.learning_rate <= 0:
        raise ValueError(f"--learning-rate {args.learning_rate} must be positive")
    if args.samples_per_prompt != 1 and (args.samples_per_prompt < 1 or args.data or args.temp <= 0):
        raise ValueError(f"--samples-per-prompt {args.samples_per_prompt}: use 1, or more with --prompts and --temp > 0")
    if not 0 <= args.val_split < 1:
        raise ValueError(f"--val-split {args.val_split} must be in [0, 1)")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file: pass a folder")
    out.mkdir(parents=True, exist_ok=True)  # fails now, not after the data is built
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "cache"
    base, lm_head, tokenizer, model_id = load_base(args.model)
    cfg = MedusaConfig(num_heads=args.num_heads, hidden_size=base.args.hidden_size, vocab_size=base.args.vocab_size,
                       num_layers=args.num_layers, own_lm_head=args.layout == "own", next_token=args.next_token,
                       base_model=model_id)
    if args.draft_vocab:
        check_draft_size(args.draft_vocab, cfg.vocab_size)  # before the data is built
    if args.draft_vocab and args.layout == "own":
        raise ValueError("--draft-vocab needs heads that share the base lm_head (--layout shared)")
    init = saved_heads(args.init_from, cfg) if args.init_from else None  # checked before the data is built
    common = dict(model=model_id, val_split=args.val_split, seed=args.seed)
    if args.data:
        docs = read_documents(args.data, tokenizer, args.seq_len)[: args.num_prompts]
        key = cache_key(data=hashlib.sha256(Path(args.data).read_bytes()).hexdigest(), n=len(docs),
                        seq_len=args.seq_len, **common)
        meta = build_cache(cache_dir, base, lm_head, docs=docs, key=key, val_split=args.val_split,
                           batch_size=args.gen_batch_size, seed=args.seed)
    else:
        prompts = read_prompts(args.prompts or DEFAULT_PROMPTS)[: args.num_prompts]
        extra = {"samples": args.samples_per_prompt} if args.samples_per_prompt != 1 else {}
        key = cache_key(prompts=prompts, max_tokens=args.max_tokens, temp=args.temp, **extra, **common)
        meta = build_cache(cache_dir, base, lm_head, prompts=[chat_ids(tokenizer, p) for p in prompts],
                           eos=eos_ids(tokenizer), key=key, val_split=args.val_split, max_tokens=args.max_tokens,
                           batch_size=args.gen_batch_size, temp=args.temp, seed=args.seed,
                           samples=args.samples_per_prompt)
    print(f"data: {meta['data']}; rows train {meta['rows']['train']}, val {meta['rows']['val']} ({cache_dir})")
    if args.data_only:
        return {}

    per_epoch = steps_per_epoch(meta, args.batch_size)
    epochs = 1.0 if args.epochs is None else args.epochs
    steps = args.iters if args.iters is not None else max(int(math.ceil(epochs * per_epoch)), 1)
    warmup = args.warmup if args.warmup is not None else max(steps // 20, 1)
    heads = new_heads(cfg, lm_head.weight if args.layout == "own" and hasattr(lm_head, "weight")
                      else base.model.embed_tokens.weight, args.seed)
    if init is not None:
        weights, saved = init
        init_from(heads, weights, saved)
        print(f"starting from {args.init_from} ({saved.num_heads} heads, {saved.num_layers} layers"
              f"{', next-token' if saved.next_token else ''})")
    tic = time.perf_counter()
    metrics = train(heads, lm_head, cache_dir, meta, steps=steps, batch_size=args.batch_size, lr=args.learning_rate,
                    warmup=warmup, loss=args.loss, seed=args.seed, eval_every=args.steps_per_eval,
                    save_every=args.save_every, checkpoint=out / "checkpoint", resume=args.resume,
                    weight_decay=args.weight_decay, noise=args.noise, embed=base.model.embed_tokens)
    heads.config.info = {
        "data": meta["data"], "rows": meta["rows"], "sequences": meta["sequences"], "data_seconds": meta["seconds"],
        "steps": steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate, "loss": args.loss,
        "epochs": round(steps / per_epoch, 2), "train_seconds": round(time.perf_counter() - tic, 1),
        "val_top1": metrics.get("top1"), "val_top5": metrics.get("top5"), "val_rows": metrics.get("rows"),
        "train_top1": metrics.get("train_top1_per_head"),
    }
    if init is not None:
        heads.config.info["init_from"] = {"path": str(args.init_from), "layers": saved.num_layers,
                                          **{k: saved.info[k] for k in ("steps", "epochs", "val_top1") if k in saved.info}}
    if args.draft_vocab:
        from .model import lm_head_rows

        train_files = [f["file"] for f in meta["splits"]["train"]]
        heads.draft_vocab = draft_vocabulary(cache_dir, train_files, args.draft_vocab, cfg.vocab_size)
        heads.config.draft_vocab_size = args.draft_vocab
        heads.config.info["draft_vocab"] = args.draft_vocab
        if meta["splits"]["val"]:
            d = evaluate(heads, lm_head, cache_dir, [f["file"] for f in meta["splits"]["val"]], args.batch_size,
                         embed=base.model.embed_tokens, draft=lm_head_rows(base, heads.draft_vocab))
            heads.config.info["val_top1_draft"] = d["top1"]
            print(f"over the {args.draft_vocab}-token draft vocabulary: val top-1 {d['top1']}")
    heads.save(out)
    for i in range(heads.num_heads):
        if "top1" in metrics:
            print(f"head {i}: val top-1 {metrics['top1'][i]:.3f}, top-5 {metrics['top5'][i]:.3f}")
    print(f"saved {heads.num_heads} heads to {out}")
    return metrics


if __name__ == "__main__":
    main()
