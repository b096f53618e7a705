"""distributed_env: each launcher's variables give the process's place, the innermost launcher
wins, and an sbatch script's own environment is not mistaken for an srun step. (The real
launchers: test_train.py for deepspeed, test_mpirun.py for mpirun, test_slurm.py for srun.)"""

import pytest

from soft_ds.distributed import DistributedEnv, distributed_env

DEEPSPEED = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}
MPIRUN = {"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_LOCAL_RANK": "2", "OMPI_COMM_WORLD_SIZE": "8"}
SRUN_STEP = {"SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_STEP_NUM_TASKS": "32", "SLURM_NTASKS": "32"}
# The batch script of `sbatch --nodes 4 --ntasks-per-node 8`: Slurm sets these, but it is one process.
SBATCH_SCRIPT = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "32", "SLURM_JOB_ID": "4242"}


@pytest.mark.parametrize("environ, expected", [
    ({}, DistributedEnv(0, 0, 1, "no launcher")),
    (DEEPSPEED, DistributedEnv(5, 1, 8, "deepspeed/torchrun")),
    (MPIRUN, DistributedEnv(6, 2, 8, "mpirun (Open MPI)")),
    (SRUN_STEP, DistributedEnv(13, 5, 32, "srun")),
    (SBATCH_SCRIPT, DistributedEnv(0, 0, 1, "no launcher")),
    ({**SBATCH_SCRIPT, **MPIRUN}, DistributedEnv(6, 2, 8, "mpirun (Open MPI)")),  # mpirun inside sbatch
    ({**SRUN_STEP, **DEEPSPEED}, DistributedEnv(5, 1, 8, "deepspeed/torchrun")),  # deepspeed per node under srun
    ({"RANK": "3", "WORLD_SIZE": "4", **MPIRUN}, DistributedEnv(6, 2, 8, "mpirun (Open MPI)")),  # RANK alone: partial
], ids=["none", "deepspeed", "mpirun", "srun", "sbatch-script", "mpirun-in-sbatch", "deepspeed-in-srun",
        "partial-torch-vars"])
def test_distributed_env(environ, expected):
    assert distributed_env(environ) == expected
