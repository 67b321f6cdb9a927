#!/usr/bin/env bash
# Build (or refresh) the Python 3.13 environment in which the tests run exo 1.x's own runner.
#   scripts/setup_exo1.sh            idempotent: a stamp skips the work when nothing changed
# exo's source comes from its tarball beside the checkout (../shared/exo-1.x, or EXO1_TARBALL) and is
# unpacked outside the repository; packages come from PyPI only. Where no Python 3.13 or no tarball
# exists it says why and exits 0: tests/test_exo1_runner.py then skips with the same reason.
# Where:  EXO1_HOME (default ~/.cache/exo_medusa_mlx/exo1): venv/, src-<tarball hash>/.
set -euo pipefail
cd "$(dirname "$0")/.."

tarball="${EXO1_TARBALL:-../shared/exo-1.x/exo-src-b5375f8.tar.gz}"
home="${EXO1_HOME:-$HOME/.cache/exo_medusa_mlx/exo1}"
is313() { [ -n "$1" ] && "$1" -c 'import sys; assert sys.version_info[:2] == (3, 13)' 2>/dev/null; }
py="${EXO1_PYTHON:-}"
if [ -z "$py" ]; then
  for cand in "$(command -v python3.13 || true)" $(ls -d "$HOME"/.pyenv/versions/3.13*/bin/python3.13 2>/dev/null); do
    if is313 "$cand"; then py="$cand"; break; fi
  done
fi
if ! is313 "$py"; then
  echo "setup_exo1: no Python 3.13 (exo 1.x needs it; set EXO1_PYTHON): exo 1.x runner tests will skip"
  exit 0
fi
if [ ! -f "$tarball" ]; then
  echo "setup_exo1: no exo 1.x source tarball at $tarball (set EXO1_TARBALL): exo 1.x runner tests will skip"
  exit 0
fi

key="$( (sha1sum "$tarball" | cut -c1-12; sha1sum "$0" | cut -c1-12) | tr -d '\n ' | cut -c1-24)"
src="$home/src-$(sha1sum "$tarball" | cut -c1-12)"
venv="$home/venv"
stamp="$venv/.setup-$key"
if [ -f "$stamp" ]; then
  exit 0
fi
echo "setup_exo1: building $venv with $py (a few minutes, once)"
mkdir -p "$home"
if [ ! -f "$src/pyproject.toml" ]; then
  rm -rf "$src.tmp"
  mkdir -p "$src.tmp"
  tar xzf "$tarball" -C "$src.tmp"
  rm -rf "$src"
  mv "$src.tmp" "$src"
fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
log="$home/setup.log"
: > "$log"
pip() {  # quiet, the output kept for a failure
  "$venv/bin/python" -m pip install -q "$@" >> "$log" 2>&1 || { tail -n 30 "$log"; echo "setup_exo1: pip failed (log: $log)"; exit 1; }
}
# exo's own dependencies, less its Rust bindings (only exo.main and exo.routing import them).
mapfile -t deps < <("$venv/bin/python" - "$src/pyproject.toml" <<'EOF'
import sys, tomllib
for d in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]:
    if not d.replace(" ", "").startswith("exo-rs"):
        print(d)
EOF
)
# exo pins a fork of mlx 0.32.0 and of mlx-lm: PyPI's mlx 0.32.0 (CPU build on Linux) and mlx-lm stand in.
# mlx-vlm: imported by exo's MlxBuilder. numpy, safetensors, scipy-openblas32: this project's own needs.
pip "${deps[@]}" "mlx[cpu]==0.32.0; sys_platform == 'linux'" "mlx==0.32.0; sys_platform == 'darwin'" \
  mlx-lm mlx-vlm numpy safetensors "scipy-openblas32; sys_platform == 'linux'"
pip --no-deps -e "$src"
# PyPI's mlx-lm lacks exo's fork's deepseek_v4, which exo imports at module level for isinstance
# checks and its DeepSeek-V4 sharding only: empty classes under those names let the rest import.
"$venv/bin/python" - <<'EOF'
import importlib.util, pathlib
if importlib.util.find_spec("mlx_lm.models.deepseek_v4") is None:
    models = pathlib.Path(importlib.util.find_spec("mlx_lm.models").submodule_search_locations[0])
    names = ["Model", "DeepseekV4Cache", "DeepseekV4MoE", "V4Attention", "_CompressorBranch"]
    (models / "deepseek_v4.py").write_text(
        '"""Stand-in written by exo-medusa-mlx\'s scripts/setup_exo1.sh: exo\'s fork has the real one."""\n\n'
        + "".join(f"\n\nclass {n}:\n    pass\n" for n in names))
EOF
EXO_DASHBOARD_DIR="$home" EXO_HOME="$home/exo-home" \
  "$venv/bin/python" -c "import exo.worker.engines.mlx.builder, exo.worker.runner.supervisor" >/dev/null
rm -f "$venv"/.setup-*
touch "$stamp"
echo "setup_exo1: ready ($venv, exo source $src)"
