#!/usr/bin/env bash
# Installs torchspec and its core + dev dependencies into the current Python.
# torch is pinned FIRST: the CPU wheel of 2.13.0 is what the project is tested with; an
# unpinned torch would make pip fetch a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
# (pip's "Location ... is ignored" notes about local package mirrors are noise: dropped.)
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
if ! "$PY" -c "import torch" 2>/dev/null; then
  quiet "$PY" -m pip install -q "torch==2.13.0"
fi
# The distribution is torchspec-eagle3 (pyproject.toml). A checkout installed before the rename is the
# distribution `torchspec` editable from this same directory: remove it, so two distributions do not both own
# the `torchspec` package. (Any other `torchspec`, e.g. the unrelated placeholder on the public index, is left alone.)
if "$PY" -m pip show torchspec 2>/dev/null | grep -qxF "Editable project location: $PWD"; then
  "$PY" -m pip uninstall -y -q torchspec
fi
# ray is included so the Ray-launcher tests (local cluster on 127.0.0.1) run too.
quiet "$PY" -m pip install -q -e ".[dev,ray]"
"$PY" -c "import torch, torchspec; print('torchspec ready: torch', torch.__version__)"
