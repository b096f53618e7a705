#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU only; launches real multi-process DeepSpeed jobs).
set -euo pipefail
cd "$(dirname "$0")/.."
# tests/test_slurm.py and tests/test_mpirun.py start a real Slurm and Open MPI: Debian packages,
# installed here as root when missing (elsewhere those tests skip and say why). Open MPI goes in
# before any slurmd starts, or srun --mpi=pmix steps hang; its headers let mpi4py build if needed.
cluster_packages=(slurm-wlm munge openmpi-bin libopenmpi-dev)
if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null && ! dpkg -s "${cluster_packages[@]}" >/dev/null 2>&1; then
  echo "== installing ${cluster_packages[*]} (apt)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${cluster_packages[@]}" >/dev/null
fi
bash tools/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"${PYTHON:-python3}" -m pytest tests "$@"
