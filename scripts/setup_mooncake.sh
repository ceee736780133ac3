#!/usr/bin/env bash
# Installs what the Mooncake store needs, so its loopback tests (master on 127.0.0.1) run:
#  - libibverbs1 (Debian): Mooncake's library and its mooncake_master link it, even for TCP;
#  - the Mooncake wheel: on a machine without an NVIDIA driver the non-CUDA build
#    (the `mooncake-cpu` extra), since the default wheel links libcuda and cannot be imported there.
# Idempotent. apt-get needs root; without root, install libibverbs1 yourself first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
if ! ldconfig -p | grep -q "libibverbs.so.1 "; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup_mooncake: libibverbs1 is missing and this is not root: sudo apt-get install libibverbs1" >&2
    exit 1
  fi
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libibverbs1 >/dev/null
fi
if ! "$PY" -c "import mooncake.store" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then extra=mooncake; else extra=mooncake-cpu; fi
  # The two wheels write the same `mooncake` package: never keep both.
  "$PY" -m pip uninstall -y -q mooncake-transfer-engine mooncake-transfer-engine-non-cuda >/dev/null 2>&1 || true
  quiet "$PY" -m pip install -q -e ".[$extra]"
fi
"$PY" -c "import mooncake.store; print('mooncake ready')"
