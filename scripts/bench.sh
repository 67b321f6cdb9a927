#!/usr/bin/env bash
# The README's benchmark table: all methods side by side on the 24 fixed prompts,
# greedy, default model with its shipped heads and tuned tree; then the latency curve.
#   scripts/bench.sh [mlx_medusa bench options]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
# shellcheck disable=SC1091
. .venv/bin/activate
mlx_medusa bench --out runs/bench "$@"
mlx_medusa bench --latency --out runs/bench
