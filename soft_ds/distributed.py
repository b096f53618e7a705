"""Where this process runs and how the job's processes find each other.

Launcher detection (deepspeed/torchrun, mpirun, srun, or none), starting torch.distributed through
DeepSpeed, and the release of DeepSpeed's CPU shared-memory segments.
"""

import os
from typing import NamedTuple

import torch.distributed as torch_dist


class DistributedEnv(NamedTuple):
    rank: int
    local_rank: int
    world_size: int
    launcher: str  # whose variables these are


# Where each launcher puts a process's place, most specific first: a launcher started inside another
# (deepspeed or mpirun in an sbatch script) sets its own variables over the outer one's. A row
# counts only when all three of its variables are set: an sbatch script itself has SLURM_PROCID
# but not SLURM_STEP_NUM_TASKS, which srun sets in each task of a step.
LAUNCHER_VARIABLES = (
    ("deepspeed/torchrun", "RANK", "LOCAL_RANK", "WORLD_SIZE"),
    ("mpirun (Open MPI)", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("srun", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NUM_TASKS"),
)


def distributed_env(environ=os.environ) -> DistributedEnv:
    """This process's rank, local rank and world size as its launcher set them, before any
    distributed initialisation: validation and logging need them first. Rank 0 of 1 when no
    launcher's variables are set (a plain `python soft_ds/train.py`)."""
    for launcher, *names in LAUNCHER_VARIABLES:
        if all(name in environ for name in names):
            rank, local_rank, world_size = (int(environ[name]) for name in names)
            return DistributedEnv(rank, local_rank, world_size, launcher)
    return DistributedEnv(0, 0, 1, "no launcher")


def init_distributed(backend: str | None = None, port: int = 29500) -> None:
    """Start torch.distributed through DeepSpeed (the accelerator's backend by default: NCCL on
    GPUs, gloo on CPU) and release DeepSpeed's CPU shared-memory segment.

    On CPU, when every rank is on one machine, DeepSpeed maps a 69 MB segment per rank,
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>, and never unlinks it: each
    run would leave its segments behind until /dev/shm (RAM) fills. Once every rank has mapped
    every peer's segment (DeepSpeed's initialisation does that before returning, hence the
    barrier), the names can go: the mappings live on until the processes exit.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    deepspeed.init_distributed(dist_backend=backend or get_accelerator().communication_backend_name(),
                               distributed_port=port)
    segment = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
               f"{os.environ.get('MASTER_PORT', '')}_{torch_dist.get_rank()}")
    if os.path.exists(segment):
        torch_dist.barrier()
        os.unlink(segment)
