#!/usr/bin/env bash
# Set up, then run the main job: Medusa generation on the embedded default model.
#   scripts/run.sh [mlx_medusa generate options]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
if [ $# -eq 0 ]; then
  set -- --prompt "What is the capital of France?" --max-tokens 64
fi
exec mlx_medusa generate "$@"
