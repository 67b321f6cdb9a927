#!/usr/bin/env bash
# Reproduce the Medusa heads shipped for the default model (SmolLM2-135M-Instruct) in
# exo_medusa_mlx/shipped/smollm2-135m-instruct/: self-distilled data, training, tree tuning.
# (`python -m exo_medusa_mlx.training.train` is `mlx_medusa train`; likewise tune.)
#
# Budget on a 2-core CPU, measured before the batched pass of issue 23 (the data steps now
# take less; the command prints its rows/s): data about an hour, plain heads about 75
# minutes (2 epochs); greedy data 10 minutes and next-token heads 20 more; three answers
# per prompt 32 minutes and 25 more; tuning ~10.
# One OpenBLAS thread per GEMM: the frozen model's pass runs two MLX streams (--gen-lanes 2,
# one per core) and sets it itself; training is safer so on a CPU shared with other jobs
# (a second thread mostly spins). The shipped heads were made with OPENBLAS_NUM_THREADS=2
# on a quiet machine, from 522 prompts; train_prompts.json now holds 519 (three were
# bench prompts, which never train).
# SELF_INSTRUCT=N adds N prompts the base model writes itself (--self-instruct) to every
# step's data; 0 (the default) keeps the shipped recipe.
# KIND_PROMPTS=N adds step 7 (prompts of each task kind, docs/training.md); KINDS_ONLY=1 runs
# step 7 alone. The budget of every step is printed first.
set -euo pipefail
cd "$(dirname "$0")/.."
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
RUN="${RUN:-runs/default_heads}"
KIND_PROMPTS="${KIND_PROMPTS:-0}"
N=$KIND_PROMPTS
cat <<BUDGET
Wall time per step on this 2-core CPU (a quiet machine; each command prints its rows/s):
  1-2. data (519 prompts x 4 answers) ~60 min, plain heads 2 epochs ~75 min
  3.   greedy data ~10 min, next-token heads 2 epochs ~20 min
  3b.  three answers per prompt ~32 min, one epoch ~25 min
  4.   tune ~10 min
  6.   HYDRA=1: self-instruct ~16 min, data ~75 min, heads ~65 min an epoch, tune ~10 min
  7.   KIND_PROMPTS=$N (0: skipped): the model writes the kinds' texts ~$((N * 8 / 60)) min and answers
       519 + 8 x $N prompts ~$((13 + N * 48 / 60)) min (a long prompt's prefill alone is ~15 s);
       next-token heads ~$(((519 + 8 * N) * 140 * 145 / 1000000)) min an epoch (2 epochs); tune ~10 min;
       bench --suite kinds ~30 min, before and after
BUDGET
OUT=exo_medusa_mlx/shipped/smollm2-135m-instruct
NICE="nice -n 5"
PY="${PYTHON:-python}"  # the project venv's python (activate it first)
SELF_INSTRUCT="${SELF_INSTRUCT:-0}"
GEN=(--gen-batch-size 128 --gen-lanes 2 --self-instruct "$SELF_INSTRUCT" --self-instruct-dir "$RUN/self_instruct")

# 7. Prompts of every task kind (chat with an earlier exchange, translation, summaries, questions
#    over a passage, math, code, RAG, long 1-2k-token prompts; docs/training.md), KIND_PROMPTS of
#    each, made from texts the base model writes, plus the training prompts; greedy answers.
#    Budget measured with 12 per kind (batch 128, 2 lanes, OPENBLAS_NUM_THREADS=2, a mostly quiet
#    machine): writing 6 min (rounds of 128 texts), answering 128 prompts 618 s (25 rows/s; the
#    long and RAG prompts' prefill dominates: a 1500-token prompt takes ~15 s before its first
#    token). 160 of each: about 2.5-3 hours for the data. A killed run continues (the texts'
#    rounds in $RUN/kinds/texts, the answers after the last complete hidden-state file).
#    Then next-token heads from the shipped ones on that data, their tree, and the per-kind bench
#    (mean accepted, speed-up and each head's held-out top-1 per kind) before and after.
#    Copy the heads into $OUT only if the per-kind table says they pay, on every kind.
kinds_step() {
    local KIND_DATA=("$PY" -m exo_medusa_mlx.training.train --cache-dir "$RUN/kinds/cache"
        --kinds-dir "$RUN/kinds/texts" --prompts exo_medusa_mlx/data/train_prompts.json --kinds all
        --kind-prompts "$KIND_PROMPTS" --max-tokens 160 --gen-batch-size 128 --gen-lanes 2
        --samples-per-prompt 1 --temp 0 --val-split 0.05 --seed 0)
    $NICE "${KIND_DATA[@]}" --output "$RUN/kinds" --data-only
    $NICE "${KIND_DATA[@]}" --output "$RUN/kinds/heads" --num-heads 3 --num-layers 1 --layout shared --loss ce \
        --next-token --draft-vocab 8192 --init-from "$OUT" --learning-rate 1e-3 --batch-size 64 --epochs 2 \
        --steps-per-eval 1000 --save-every 500
    $NICE "$PY" -m exo_medusa_mlx.tune --heads "$RUN/kinds/heads" --prompts exo_medusa_mlx/data/heldout_prompts.json \
        --cache-dir "$RUN/heldout_cache" --max-nodes 16 --min-nodes 2 --num-prompts 8 --max-tokens 128 \
        --output "$RUN/kinds/heads/tree.json"
    "$PY" -m exo_medusa_mlx.bench.main --suite kinds --accuracy --trees default,dynamic --out "$RUN/kinds/bench_shipped"
    "$PY" -m exo_medusa_mlx.bench.main --suite kinds --accuracy --trees default,dynamic --heads "$RUN/kinds/heads" \
        --out "$RUN/kinds/bench_new"
}
if [[ "${KINDS_ONLY:-0}" == 1 ]]; then
    (( KIND_PROMPTS > 0 )) || { echo "KINDS_ONLY=1 needs KIND_PROMPTS=N (e.g. 160)" >&2; exit 1; }
    kinds_step
    exit 0
fi

# 1. The base model answers the 519 training prompts four times each (chat template, up to
#    160 tokens, 128 sequences at a time): once greedily, three times sampled at temperature
#    0.8. Labels are always its argmax, so a sampled answer teaches what greedy decoding would
#    say from there. Hidden states and labels go to shards in $RUN/cache.
# 2. Three heads (one ResBlock each, reusing the base lm_head) train on them: CE at t+2+i,
#    weights 0.8^i, AdamW, cosine schedule; 5% of the prompts (all their answers) are held
#    out for validation. The shipped heads ran one epoch, then a second one resumed from its
#    checkpoint under the 2-epoch schedule (the learning rate restarts at 5.6e-4 and decays
#    again): the same two commands reproduce them. The second epoch moved held-out top-1
#    from 0.30/0.16/0.09 to 0.31/0.17/0.11.
TRAIN=("$PY" -m exo_medusa_mlx.training.train --output "$RUN" --cache-dir "$RUN/cache"
    --prompts exo_medusa_mlx/data/train_prompts.json --max-tokens 160 "${GEN[@]}" --val-split 0.05
    --samples-per-prompt 4 --temp 0.8
    --num-heads 3 --num-layers 1 --layout shared --loss ce
    --learning-rate 1e-3 --batch-size 64 --steps-per-eval 1000 --save-every 200 --seed 0)
$NICE "${TRAIN[@]}" --epochs 1
$NICE "${TRAIN[@]}" --epochs 2 --resume

# 3. The shipped heads are next-token heads (docs/training.md): the plain heads above, now also
#    reading the embedding of the base model's next token (maps starting at zero), trained two
#    more epochs on the greedy answers alone (one per prompt: the fed token is the argmax, as
#    in greedy decoding; the same 5% of prompts held out), their guesses scored over the 8192
#    tokens the model emits most in that data (--draft-vocab: on this CPU the heads' second
#    pass over lm_head would otherwise cost 13 ms a step). Held-out top-1 went from
#    0.31/0.17/0.11 to 0.40/0.20/0.13.
NEXT=("$PY" -m exo_medusa_mlx.training.train
    --prompts exo_medusa_mlx/data/train_prompts.json --max-tokens 160 "${GEN[@]}" --val-split 0.05
    --num-heads 3 --num-layers 1 --layout shared --loss ce --next-token --draft-vocab 8192
    --learning-rate 1e-3 --batch-size 64 --seed 0)
$NICE "${NEXT[@]}" --output "$RUN/next" --cache-dir "$RUN/greedy_cache" --samples-per-prompt 1 --temp 0 \
    --init-from "$RUN" --epochs 2 --steps-per-eval 600 --save-every 200

# 3b. One more epoch on answers given three times each (the first greedy, two sampled at
#     temperature 0.8; the fed token is the sampled one, the labels the argmax), from the
#     heads of step 3 (its 5% of prompts still held out): 173k rows instead of 57k. Held-out
#     top-1 went from 0.40/0.20/0.13 to 0.42/0.22/0.14, bench (c) from 1.38x to 1.42x.
$NICE "${NEXT[@]}" --output "$RUN/next3" --cache-dir "$RUN/sampled3_cache" --samples-per-prompt 3 --temp 0.8 \
    --init-from "$RUN/next" --epochs 1 --steps-per-eval 1000 --save-every 500

mkdir -p "$OUT"
cp "$RUN/next3/medusa_lm_head.safetensors" "$RUN/next3/config.json" "$OUT/"

# 4. Size the tree to the heads and to this machine on the held-out prompts, check it with
#    real generation against plain decoding, and write $OUT/tree.json. --min-nodes 2: the
#    shipped tree always guesses (a root-only tree decodes plainly, heads unused); the tune
#    report says whether that beats plain decoding on this machine.
$NICE "$PY" -m exo_medusa_mlx.tune --heads "$OUT" --prompts exo_medusa_mlx/data/heldout_prompts.json \
    --cache-dir "$RUN/heldout_cache" --max-nodes 16 --min-nodes 2 --num-prompts 8 --max-tokens 128 --output "$OUT/tree.json"

# 5. The torch backend reads $OUT/tree.torch.json first. On this CPU its verify forward
#    of 4 tokens costs about 1.8x one token (MLX's: 1.3x), so it keeps one guess, the root
#    plus head 0's top-1: with it `mlx_medusa bench` (f) ran at 1.29x, with the MLX tree 1.04x.
echo '{"choices": [[0]], "topk": 1}' > "$OUT/tree.torch.json"

# 6. Optional, not yet run to the end (HYDRA=1): hydra heads (docs/training.md) from the shipped
#    next-token heads, on the greedy answers to the training prompts plus 3000 the model
#    writes itself. Budget on this 2-core CPU: self-instruct about 16 minutes; the data
#    about 75 minutes (about 450k rows at about 100 rows/s); training about 65 minutes per
#    epoch (the next-token heads took 25 minutes for 173k rows); tuning about 10. Then compare
#    the held-out top-1 it prints with the shipped heads' and run `mlx_medusa bench --heads
#    "$RUN/hydra/heads"` before copying anything into $OUT.
if [[ "${HYDRA:-0}" == 1 ]]; then
    HYDRA_DATA=("$PY" -m exo_medusa_mlx.training.train --cache-dir "$RUN/hydra/cache"
        --prompts exo_medusa_mlx/data/train_prompts.json --self-instruct 3000
        --self-instruct-dir "$RUN/hydra/self_instruct" --max-tokens 160 --gen-batch-size 128 --gen-lanes 2
        --samples-per-prompt 1 --temp 0 --val-split 0.05 --num-heads 3 --hydra --draft-vocab 8192 --seed 0)
    $NICE "${HYDRA_DATA[@]}" --output "$RUN/hydra" --data-only
    $NICE "${HYDRA_DATA[@]}" --output "$RUN/hydra/heads" --init-from "$OUT" --learning-rate 1e-3 \
        --batch-size 64 --epochs 1 --steps-per-eval 1000 --save-every 500
    $NICE "$PY" -m exo_medusa_mlx.tune --heads "$RUN/hydra/heads" --prompts exo_medusa_mlx/data/heldout_prompts.json \
        --cache-dir "$RUN/heldout_cache" --max-nodes 16 --min-nodes 2 --num-prompts 8 --max-tokens 128 \
        --output "$RUN/hydra/heads/tree.json"
fi

if (( KIND_PROMPTS > 0 )); then
    kinds_step
fi
