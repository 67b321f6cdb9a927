#!/usr/bin/env bash
# Set up, then run the whole test suite.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test || exit 1
# exo 1.x's Python 3.13 venv for tests/test_exo1_runner.py (says why and skips where there is no 3.13).
scripts/setup_exo1.sh || exit 1
# shellcheck disable=SC1091
. .venv/bin/activate
# exo 0.0.x's source for tests/test_exo_real.py, where it sits beside the checkout.
if [ -z "${EXO_SRC:-}" ] && [ -d ../shared/exo-0.0.x ]; then
  EXO_SRC="$(cd ../shared/exo-0.0.x && pwd)"
  export EXO_SRC
fi
# The test extra is installed: a module skipped for a missing import would hide a feature.
EXO_MEDUSA_REQUIRE_ALL=1 python -m pytest -q "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests: the suite is missing, which is a failure here" >&2
  exit 1
fi
exit $rc
