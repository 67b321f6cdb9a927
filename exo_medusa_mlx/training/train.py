"""``mlx_medusa train``: Medusa-1 heads on a frozen base model, in MLX.

The data is the base model's own: its answers to a prompt set (the shipped
prompts, the user's, and prompts it writes itself; generated many at once,
greedy by default), or a text/JSONL file relabelled with its predictions
(train_data.py). The frozen model runs once; its last hidden states and its own
next-token choices go to hidden-state files on disk, and the heads train on those.
The base lm_head stays in the loss, so the heads learn in its vocabulary space.

Targets: a row is one position t with hidden state h_t and the base model's
argmax there, label_t (the token at t+1 for greedy data). Head i at t predicts
the token at t+2+i, so its target is label_{t+1+i}, weighted 0.8^i.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from tqdm.auto import tqdm

from ..core.heads_format import MedusaConfig
from ..heads import MedusaHeads
from .checkpoints import init_from, resume_from, save_checkpoint, saved_heads
from .data import build_data, load_base, prompt_sources
from .hidden_files import iterate_batches
from .loss import evaluate, loss_fn, path_embeds
from .options import TrainOptions, setup_arg_parser

# --------------------------------------------------------------------------- training


def check_draft_size(size: int, vocab_size: int) -> None:
    if not 1 <= size < vocab_size:
        raise ValueError(f"--draft-vocab {size} must be in 1..{vocab_size - 1} (0: the whole vocabulary)")


def draft_vocabulary(folder: Path, files: list[str], size: int, vocab_size: int) -> np.ndarray:
    """The ``size`` tokens the base model emits most often in the cache (ties: lower ids,
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


def steps_per_epoch(meta: dict, batch_size: int) -> int:
    # A sequence's last row has no head target and is dropped by load_part.
    usable = meta["rows"]["train"] - meta["sequences"]["train"]
    return max(usable // batch_size, 1)


def _split_files(meta: dict, cache_dir: Path, batch_size: int) -> tuple[list[str], list[str]]:
    """The cache's train and val part files, refusing a cache with too few rows to train on."""
    train_files = [f["file"] for f in meta["splits"]["train"]]
    val_files = [f["file"] for f in meta["splits"]["val"]]
    if not train_files:
        raise ValueError(f"{cache_dir}: no training rows (all data went to --val-split?)")
    usable = meta["rows"]["train"] - meta["sequences"]["train"]
    if usable < batch_size:
        raise ValueError(f"{cache_dir}: {usable} training rows, fewer than --batch-size {batch_size}: "
                         "lower --batch-size or add data")
    return train_files, val_files


def _updater(heads: MedusaHeads, lm_head, opt, loss: str, noise: float, embed):
    """One optimiser step on a batch: ``update(batch, step) -> (loss, per-head loss, per-head top-1)``."""
    step_fn = nn.value_and_grad(heads, loss_fn)

    def update(b: dict, step: int):
        h = mx.array(b["hidden"], dtype=mx.float32)
        if noise > 0:
            rms = mx.sqrt(mx.mean(h * h, axis=-1, keepdims=True))
            h = h + noise * rms * mx.random.normal(h.shape)
        teacher = [mx.array(b["teacher_ids"]), mx.array(b["teacher_probs"])] if loss == "kl" else [None, None]
        (value, (per_head, top1)), grads = step_fn(heads, lm_head, h, mx.array(b["targets"]), *teacher,
                                                   path_embeds(heads, embed, b))
        opt.update(heads, grads)
        mx.eval(heads.parameters(), opt.state, value, per_head, top1)
        if not np.isfinite(float(value)):  # diverged: stop before these heads reach a checkpoint
            raise ValueError(f"training diverged: the loss is {float(value)} at step {step}; lower "
                             "--learning-rate (no heads were saved from this step)")
        return float(value), np.array(per_head), np.array(top1)

    return update


def train(heads: MedusaHeads, lm_head, cache_dir: Path, meta: dict, *, steps: int, batch_size: int, lr: float,
          warmup: int, loss: str = "ce", seed: int = 0, eval_every: int = 0, save_every: int = 0,
          checkpoint: Path | None = None, resume: bool = False, weight_decay: float = 0.0, noise: float = 0.0,
          embed=None, log=print) -> dict:
    """Train ``heads`` in place on the cached train split; returns the last val metrics (if any).

    ``noise``: Gaussian noise added to the input hidden states, as a fraction of
    their RMS (a regulariser: the heads see each cached state once per epoch).
    ``embed``: the base model's token embedding, which next-token heads read.
    """
    train_files, val_files = _split_files(meta, cache_dir, batch_size)
    per_epoch = steps_per_epoch(meta, batch_size)
    opt = optim.AdamW(learning_rate=make_schedule(lr, steps, warmup), weight_decay=weight_decay)
    start = resume_from(checkpoint, heads, opt, log) if resume else 0
    update = _updater(heads, lm_head, opt, loss, noise, embed)
    mx.random.seed(seed + start)

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
            value, per_head, top1 = update(b, step)
            smooth = np.stack([per_head, top1]) if smooth is None else 0.9 * smooth + 0.1 * np.stack([per_head, top1])
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", acc="/".join(f"{a:.2f}" for a in smooth[1]),
                            lr=f"{float(opt.learning_rate):.1e}")
            if val_files and eval_every and step % eval_every == 0 and step < steps:
                metrics = evaluate(heads, lm_head, cache_dir, val_files, batch_size, embed=embed)
                bar.write(f"step {step}: val top-1 {metrics['top1']}, top-5 {metrics['top5']}")
            if checkpoint is not None and save_every and step % save_every == 0:
                save_checkpoint(checkpoint, heads, opt, step)
            if step >= steps or step - epoch * per_epoch >= per_epoch:
                break
        epoch += 1
    bar.close()
    if checkpoint is not None and save_every:
        save_checkpoint(checkpoint, heads, opt, step)
    metrics = evaluate(heads, lm_head, cache_dir, val_files, batch_size, embed=embed) if val_files else {}
    metrics["train_loss_per_head"] = [round(float(x), 4) for x in smooth[0]] if smooth is not None else None
    metrics["train_top1_per_head"] = [round(float(x), 4) for x in smooth[1]] if smooth is not None else None
    return metrics


# --------------------------------------------------------------------------- the command


def run(args: TrainOptions | argparse.Namespace) -> dict:
    """Build (or reuse) the data, train heads on it, save them; returns the last val metrics."""
    opts = args if isinstance(args, TrainOptions) else TrainOptions.from_args(args)
    opts.validate()
    out = Path(opts.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file: pass a folder")
    sources = prompt_sources(opts)  # bad prompt files fail before the model loads
    out.mkdir(parents=True, exist_ok=True)  # fails now, not after the data is built
    cache_dir = Path(opts.cache_dir) if opts.cache_dir else out / "cache"
    base, lm_head, tokenizer, model_id = load_base(opts.model)
    cfg = MedusaConfig(num_heads=opts.num_heads, hidden_size=base.args.hidden_size, vocab_size=base.args.vocab_size,
                       num_layers=opts.num_layers, own_lm_head=opts.layout == "own", next_token=opts.next_token,
                       hydra=opts.hydra,
                       base_model=model_id)
    if opts.draft_vocab:
        check_draft_size(opts.draft_vocab, cfg.vocab_size)  # before the data is built
    init = saved_heads(opts.init_from, cfg) if opts.init_from else None  # checked before the data is built
    meta = build_data(opts, sources, base, lm_head, tokenizer, model_id, out, cache_dir)
    print(f"data: {meta['data']}; rows train {meta['rows']['train']}, val {meta['rows']['val']} ({cache_dir})")
    if opts.data_only:
        return {}
    per_epoch = steps_per_epoch(meta, opts.batch_size)
    epochs = 1.0 if opts.epochs is None else opts.epochs
    steps = opts.iters if opts.iters is not None else max(int(math.ceil(epochs * per_epoch)), 1)
    heads = new_heads(cfg, lm_head.weight if opts.layout == "own" and hasattr(lm_head, "weight")
                      else base.model.embed_tokens.weight, opts.seed)
    if init is not None:
        init_from(heads, *init)
        print(f"starting from {opts.init_from} ({init[1].num_heads} heads, {init[1].num_layers} layers"
              f"{', ' + init[1].layout if init[1].layout != 'medusa' else ''})")
    tic = time.perf_counter()
    metrics = train(heads, lm_head, cache_dir, meta, steps=steps, batch_size=opts.batch_size, lr=opts.learning_rate,
                    warmup=opts.warmup if opts.warmup is not None else max(steps // 20, 1), loss=opts.loss,
                    seed=opts.seed, eval_every=opts.steps_per_eval, save_every=opts.save_every,
                    checkpoint=out / "checkpoint", resume=opts.resume, weight_decay=opts.weight_decay,
                    noise=opts.noise, embed=base.model.embed_tokens)
    heads.config.info = {
        "data": meta["data"], "rows": meta["rows"], "sequences": meta["sequences"], "data_seconds": meta["seconds"],
        "steps": steps, "batch_size": opts.batch_size, "learning_rate": opts.learning_rate, "loss": opts.loss,
        "epochs": round(steps / per_epoch, 2), "train_seconds": round(time.perf_counter() - tic, 1),
        "val_top1": metrics.get("top1"), "val_top5": metrics.get("top5"), "val_rows": metrics.get("rows"),
        "train_top1": metrics.get("train_top1_per_head"), "mix": meta.get("mix"),
    }
    _finish(opts, heads, base, lm_head, cache_dir, meta, init, metrics, out)
    return metrics


def _finish(opts: TrainOptions, heads: MedusaHeads, base, lm_head, cache_dir: Path, meta: dict, init, metrics: dict,
            out: Path) -> None:
    """Record where the heads started, pick the draft vocabulary, save, and print the val accuracies."""
    if init is not None:
        saved = init[1]
        heads.config.info["init_from"] = {"path": str(opts.init_from), "layers": saved.num_layers,
                                          **{k: saved.info[k] for k in ("steps", "epochs", "val_top1") if k in saved.info}}
    if opts.draft_vocab:
        from ..model import lm_head_rows

        train_files = [f["file"] for f in meta["splits"]["train"]]
        heads.draft_vocab = draft_vocabulary(cache_dir, train_files, opts.draft_vocab, heads.config.vocab_size)
        heads.config.draft_vocab_size = opts.draft_vocab
        heads.config.info["draft_vocab"] = opts.draft_vocab
        if meta["splits"]["val"]:
            d = evaluate(heads, lm_head, cache_dir, [f["file"] for f in meta["splits"]["val"]], opts.batch_size,
                         embed=base.model.embed_tokens, draft=lm_head_rows(base, heads.draft_vocab))
            heads.config.info["val_top1_draft"] = d["top1"]
            print(f"over the {opts.draft_vocab}-token draft vocabulary: val top-1 {d['top1']}")
    heads.save(out)
    for i in range(heads.num_heads):
        if "top1" in metrics:
            print(f"head {i}: val top-1 {metrics['top1'][i]:.3f}, top-5 {metrics['top5'][i]:.3f}")
    print(f"saved {heads.num_heads} heads to {out}")


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
