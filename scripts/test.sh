#!/usr/bin/env bash
# The test command (README command 2; .ci/run calls exactly this). Set-up included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
# pytest exits 5 when it collects no tests: that counts as a failure here, as every non-zero does.
exec "$PY" -m pytest -q "$@"
