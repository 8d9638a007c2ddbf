#!/usr/bin/env bash
# Set up (tools/setup.sh) and run the whole test suite, as CI does.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
bash tools/setup_arm.sh     # aarch64 cross compiler, qemu, aarch64 TVM runtime + runner (arm-sve tests)
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${GRAPHOPT_TEST_WORKERS:-2}" "$@"
