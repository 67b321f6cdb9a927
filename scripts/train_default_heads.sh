#!/usr/bin/env bash
# Reproduce the Medusa heads shipped for the default model (SmolLM2-135M-Instruct) in
# exo_medusa_mlx/shipped/smollm2-135m-instruct/: self-distilled data, training, tree tuning.
# (`python -m exo_medusa_mlx.train` is `mlx_medusa train`; likewise tune.)
#
# Budget: data + training in about 45 minutes on a shared 2-core CPU; tuning takes ~10 more.
# One OpenBLAS thread: on a CPU shared with other jobs a second thread mostly spins.
# On a quiet machine, OPENBLAS_NUM_THREADS=2 is faster.
set -euo pipefail
cd "$(dirname "$0")/.."
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
RUN="${RUN:-runs/default_heads}"
OUT=exo_medusa_mlx/shipped/smollm2-135m-instruct
NICE="nice -n 5"
PY="${PYTHON:-python}"  # the project venv's python (activate it first)

# 1. The base model answers the 522 training prompts (chat template, greedy, up to 160 tokens,
#    64 at a time); its last hidden states and choices go to shards in $RUN/cache.
# 2. Three heads (one ResBlock each, reusing the base lm_head) train on them: CE at t+2+i,
#    weights 0.8^i, AdamW, cosine schedule; 5% of the prompts are held out for validation.
$NICE "$PY" -m exo_medusa_mlx.train --output "$RUN" --cache-dir "$RUN/cache" \
    --prompts exo_medusa_mlx/data/train_prompts.json --max-tokens 160 --gen-batch-size 64 --val-split 0.05 \
    --num-heads 3 --num-layers 1 --layout shared --loss ce \
    --learning-rate 1e-3 --batch-size 32 --epochs 1.2 --steps-per-eval 500 --save-every 200 --seed 0

mkdir -p "$OUT"
cp "$RUN/medusa_lm_head.safetensors" "$RUN/config.json" "$OUT/"

# 3. Size the tree to the heads and to this machine on the held-out prompts, check it with
#    real generation against plain decoding, and write $OUT/tree.json. --min-nodes 2: with the
#    heads loaded, a root-only tree still pays the heads' projection every step, so even when
#    no tree beats plain decoding here, the best tree with a guess is the better default.
$NICE "$PY" -m exo_medusa_mlx.tune --heads "$OUT" --prompts exo_medusa_mlx/data/heldout_prompts.json \
    --cache-dir "$RUN/heldout_cache" --max-nodes 16 --min-nodes 2 --num-prompts 8 --max-tokens 128 --output "$OUT/tree.json"
