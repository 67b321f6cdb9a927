"""``mlx_medusa train``'s flags: one rule per number flag (``cli_args``), the options
dataclass the command and Python callers fill, and its parser."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from ..cli_args import FRACTION, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, check_fields
from .kinds import KINDS, parse_kinds
from .prompts import DEFAULT_PROMPTS

MAX_TOKENS = 160  # answer length of self-distillation
KIND_PROMPTS = 100  # --kinds: prompts of each kind
GEN_BATCH_SIZE = 128  # sequences the frozen model runs at once
GEN_LANES = 2  # MLX streams they are split over on a CPU (one per core of a 2-core CPU)
SEQ_LEN = 512  # --data documents are cut to this many tokens
VAL_SPLIT = 0.05
NUM_HEADS = 4
LEARNING_RATE = 1e-3
BATCH_SIZE = 32  # rows per optimizer step
SAVE_EVERY = 100
# Each number flag's rule: its parser type and ``TrainOptions.validate``'s check.
RULES = dict(
    self_instruct=NON_NEGATIVE_INT, num_prompts=POSITIVE_INT, max_tokens=POSITIVE_INT, temp=NON_NEGATIVE,
    samples_per_prompt=POSITIVE_INT, gen_batch_size=POSITIVE_INT, gen_lanes=POSITIVE_INT, seq_len=POSITIVE_INT,
    val_split=FRACTION, num_heads=POSITIVE_INT, num_layers=POSITIVE_INT, learning_rate=POSITIVE,
    weight_decay=NON_NEGATIVE, noise=NON_NEGATIVE, warmup=NON_NEGATIVE_INT, iters=POSITIVE_INT, epochs=POSITIVE,
    batch_size=POSITIVE_INT, steps_per_eval=NON_NEGATIVE_INT, save_every=NON_NEGATIVE_INT, seed=NON_NEGATIVE_INT,
    kind_prompts=POSITIVE_INT,
)


@dataclass
class TrainOptions:
    """``mlx_medusa train``'s options (one field per flag, same names); ``from_args`` reads argparse's."""

    output: str
    model: str | None = None
    prompts: str | None = None
    data: str | None = None
    add_prompts: list[str] = field(default_factory=list)
    self_instruct: int = 0
    self_instruct_seeds: str | None = None
    self_instruct_dir: str | None = None
    kinds: str | None = None
    kind_prompts: int = KIND_PROMPTS
    kinds_dir: str | None = None
    num_prompts: int | None = None
    max_tokens: int = MAX_TOKENS
    temp: float = 0.0
    samples_per_prompt: int = 1
    gen_batch_size: int = GEN_BATCH_SIZE
    gen_lanes: int = GEN_LANES
    seq_len: int = SEQ_LEN
    cache_dir: str | None = None
    val_split: float = VAL_SPLIT
    data_only: bool = False
    num_heads: int = NUM_HEADS
    num_layers: int = 1
    layout: str = "shared"
    next_token: bool = False
    hydra: bool = False
    draft_vocab: int = 0
    loss: str = "ce"
    learning_rate: float = LEARNING_RATE
    weight_decay: float = 0.0
    noise: float = 0.0
    warmup: int | None = None
    iters: int | None = None
    epochs: float | None = None
    batch_size: int = BATCH_SIZE
    steps_per_eval: int = 0
    save_every: int = SAVE_EVERY
    resume: bool = False
    init_from: str | None = None
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainOptions":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def validate(self) -> None:
        """Flag errors before any work (ValueError naming the flag; the numbers by ``RULES``, as the parser)."""
        check_fields(self, RULES)
        if self.samples_per_prompt != 1 and (self.data or self.temp <= 0):
            raise ValueError(f"--samples-per-prompt {self.samples_per_prompt}: use 1, or more with --prompts and --temp > 0")
        if self.data and (self.add_prompts or self.self_instruct):
            raise ValueError("--add-prompts and --self-instruct add prompts to self-distil: not with --data")
        if self.data and self.kinds:
            raise ValueError("--kinds adds prompts to self-distil: not with --data")
        if self.kinds:
            parse_kinds(self.kinds)
        if self.next_token and self.hydra:
            raise ValueError("--next-token and --hydra are two layouts: hydra heads read the next token too")
        if self.draft_vocab and self.layout == "own":
            raise ValueError("--draft-vocab needs heads that share the base lm_head (--layout shared)")


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx_medusa train", allow_abbrev=False, description="Train Medusa heads (Medusa-1: frozen base) in MLX.")
    p.add_argument("--model", default=None, help="Base model folder or repo id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--output", "-o", required=True, help="Folder for the heads (medusa_lm_head.safetensors + config.json)")
    _data_flags(p)
    _heads_flags(p)
    return p


def _data_flags(p: argparse.ArgumentParser) -> None:
    """What the heads train on: prompts (or documents) and the frozen model's pass over them."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", default=None, help=f"Prompts to self-distil (JSON list or JSONL; default {DEFAULT_PROMPTS.name})")
    src.add_argument("--data", default=None, help="Text or JSONL file, relabelled with the base model's predictions")
    p.add_argument("--add-prompts", action="append", default=[], metavar="JSONL",
                   help="More prompts to self-distil, one {\"prompt\": ...} a line (repeatable)")
    p.add_argument("--self-instruct", type=RULES["self_instruct"].parse, default=0, metavar="N",
                   help="Also answer N prompts the base model writes itself from seed topics and tasks "
                        "(kept in --self-instruct-dir; a rerun continues them)")
    p.add_argument("--self-instruct-seeds", default=None, help="Seed topics and tasks (JSON; default the shipped ones)")
    p.add_argument("--self-instruct-dir", default=None,
                   help="Where the written prompts are kept (default OUTPUT/self_instruct); share it between runs")
    p.add_argument("--kinds", default=None, metavar="all|KIND,...",
                   help=f"Also answer prompts of these task kinds ({', '.join(KINDS)}) composed from texts the base "
                        "model writes (kept in --kinds-dir; a rerun continues them)")
    p.add_argument("--kind-prompts", type=RULES["kind_prompts"].parse, default=KIND_PROMPTS, metavar="N",
                   help="Prompts of each kind")
    p.add_argument("--kinds-dir", default=None, help="Where the kinds' written texts are kept (default OUTPUT/kinds)")
    p.add_argument("--num-prompts", type=RULES["num_prompts"].parse, default=None,
                   help="Use only the first N prompts (of --prompts and --add-prompts) or documents")
    p.add_argument("--max-tokens", type=RULES["max_tokens"].parse, default=MAX_TOKENS, help="Response length for self-distillation")
    p.add_argument("--temp", type=RULES["temp"].parse, default=0.0, help="Sampling temperature of the self-distilled responses")
    p.add_argument("--samples-per-prompt", type=RULES["samples_per_prompt"].parse, default=1,
                   help="Responses per prompt: the first greedy, the others sampled at --temp (> 0)")
    p.add_argument("--gen-batch-size", type=RULES["gen_batch_size"].parse, default=GEN_BATCH_SIZE, help="Sequences per batch in the frozen model's pass")
    p.add_argument("--gen-lanes", type=RULES["gen_lanes"].parse, default=GEN_LANES,
                   help="On a CPU, split that batch over N MLX streams, one thread each (MLX's element-wise ops "
                        "use one core per stream); GEMMs then get one BLAS thread each")
    p.add_argument("--seq-len", type=RULES["seq_len"].parse, default=SEQ_LEN, help="Cut --data documents to this many tokens")
    p.add_argument("--cache-dir", default=None,
                   help="Hidden-state files (default: OUTPUT/cache); reused when the data matches, resumed when unfinished")
    p.add_argument("--val-split", type=RULES["val_split"].parse, default=VAL_SPLIT, help="Fraction of sequences held out for validation")
    p.add_argument("--data-only", action="store_true", help="Build the hidden-state cache and stop")


def _heads_flags(p: argparse.ArgumentParser) -> None:
    """The heads' layout and the optimiser."""
    p.add_argument("--num-heads", type=RULES["num_heads"].parse, default=NUM_HEADS)
    p.add_argument("--num-layers", type=RULES["num_layers"].parse, default=1, help="ResBlocks per head")
    p.add_argument("--layout", choices=["shared", "own"], default="shared",
                   help="shared: heads reuse the base lm_head (small); own: each head has its own")
    p.add_argument("--next-token", action="store_true",
                   help="Heads also read the embedding of the base model's next token (its argmax, known before "
                        "the heads run); costs a second pass over lm_head per step, not the reference layout")
    p.add_argument("--hydra", action="store_true",
                   help="Sequentially dependent heads: head d also reads the embeddings of the d+1 tokens on the "
                        "path it extends (the root, then the guesses before its own), as Hydra's heads do")
    p.add_argument("--draft-vocab", type=int, default=0,
                   help="Score the heads' guesses over the N tokens the model emits most in the data (a cheaper "
                        "pass over part of lm_head; pays with --next-token on a CPU); 0: the whole vocabulary")
    p.add_argument("--loss", choices=["ce", "kl"], default="ce", help="CE to the base argmax, or KL to its top-k distribution")
    p.add_argument("--learning-rate", type=RULES["learning_rate"].parse, default=LEARNING_RATE)
    p.add_argument("--weight-decay", type=RULES["weight_decay"].parse, default=0.0)
    p.add_argument("--noise", type=RULES["noise"].parse, default=0.0, help="Gaussian noise on the input states, as a fraction of their RMS")
    p.add_argument("--warmup", type=RULES["warmup"].parse, default=None, help="Warm-up steps (default 5%% of the steps)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--iters", type=RULES["iters"].parse, default=None, help="Optimizer steps")
    g.add_argument("--epochs", type=RULES["epochs"].parse, default=None, help="Passes over the training rows (default 1)")
    p.add_argument("--batch-size", type=RULES["batch_size"].parse, default=BATCH_SIZE, help="Rows (positions) per step")
    p.add_argument("--steps-per-eval", type=RULES["steps_per_eval"].parse, default=0, help="Validate every N steps (0: at the end only)")
    p.add_argument("--save-every", type=RULES["save_every"].parse, default=SAVE_EVERY, help="Checkpoint every N steps into OUTPUT/checkpoint")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="Continue from OUTPUT/checkpoint")
    start.add_argument("--init-from", default=None,
                       help="Start from saved heads (fine-tune); with a larger --num-layers the new blocks start as the identity")
    p.add_argument("--seed", type=RULES["seed"].parse, default=0)
