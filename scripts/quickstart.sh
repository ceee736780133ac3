#!/usr/bin/env bash
# README command 1: set-up, then train an EAGLE-3 draft end to end on CPU for a small local target
# (built here from the Python standard library's sources; nothing is downloaded but pip packages).
# Artefacts are cached under .cache/quickstart, so a second run skips the target build.
# Extra arguments go to `python scripts/quickstart.py` (e.g. --rebuild, or config overrides k=v).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
exec "$PY" scripts/quickstart.py "$@"
