#!/usr/bin/env bash
# Installs torchspec and its core + dev dependencies into the current Python.
# torch is pinned FIRST: the CPU wheel of 2.13.0 is what the project is tested with; an
# unpinned torch would make pip fetch a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
# ray is included so the Ray-launcher tests (local cluster on 127.0.0.1) run too.
"$PY" -m pip install -q -e ".[dev,ray]"
