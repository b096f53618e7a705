#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU only; launches real multi-process DeepSpeed jobs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"${PYTHON:-python3}" -m pytest tests "$@"
