#!/usr/bin/env bash
# Start a local ring of node processes with Medusa on, ask it one prompt, print the answer.
#
#   scripts/run_exo_medusa.sh --prompt "What is the capital of France?" [more `mlx_medusa ring` options]
#
# (python -m exo_medusa_mlx.ring.command = mlx_medusa ring.) The answer streams to stdout,
# the ring's stats (per-node timings, mean accepted length) go to stderr; every node is
# stopped on exit. Defaults: the default model and its shipped heads, 2 nodes, MLX then torch;
# override with NODES=3 BACKENDS=mlx,torch,mlx, or pass --nodes/--backends/--heads yourself.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x "$here/.venv/bin/python" ]; then PY="$here/.venv/bin/python"; else PY=python3; fi
fi
exec "$PY" -m exo_medusa_mlx.ring.command --nodes "${NODES:-2}" --backends "${BACKENDS:-mlx,torch}" "$@"
