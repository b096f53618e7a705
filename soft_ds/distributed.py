"""Where this process runs and how the job's processes find each other.

A job starts in two steps, with the run's validation between them (it needs the world size, and
must finish before any distributed work):

    place = distributed_env()                        # rank, local rank, world size, launcher
    environment = deepspeed_environment(place)       # how the ranks meet; LaunchError if they cannot
    ...validate the run against place.world_size...
    init_distributed(environment=environment)        # torch.distributed through DeepSpeed

Launchers: deepspeed/torchrun, mpirun, srun, or none (a plain `python soft_ds/train.py` is one
process on 127.0.0.1 and a free port, and never touches MPI). init_distributed also releases
DeepSpeed's CPU shared-memory segment.
"""

import os
import socket
from typing import NamedTuple

import torch
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


class LaunchError(ValueError):
    """The job's processes have no way to find rank 0."""


DEFAULT_PORT = 29500  # DeepSpeed's and torch's default rendezvous port


def free_port() -> int:
    """A TCP port free on this machine now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def visible_cuda_devices() -> int:
    """How many CUDA devices this process sees (0 without CUDA)."""
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cuda_device_index(local_rank: int, visible: int) -> int:
    """The CUDA device (index among the visible ones) a process of this local rank uses.

    Its local rank where it sees a GPU per local rank (the deepspeed launcher, torchrun, mpirun on
    a node's GPUs); the only one where it sees one (`srun --gpus-per-task=1` sets
    CUDA_VISIBLE_DEVICES per task, while SLURM_LOCALID goes up to 7). Otherwise two processes
    would share a GPU: a LaunchError."""
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    raise LaunchError(f"local rank {local_rank} sees {visible} CUDA devices (CUDA_VISIBLE_DEVICES="
                      f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most {visible} processes per node, "
                      f"or give each task one GPU (srun --gpus-per-task=1)")


def deepspeed_environment(place: DistributedEnv, environ=os.environ, pick_port=free_port,
                          cuda_devices: int | None = None) -> dict[str, str]:
    """The variables DeepSpeed starts torch.distributed from: RANK, LOCAL_RANK, WORLD_SIZE (this
    process's place) and MASTER_ADDR, MASTER_PORT (where rank 0 listens).

    On GPUs LOCAL_RANK is the CUDA device this process uses (`cuda_device_index`), which is what
    DeepSpeed takes it for (its engine and PipelineModule move to cuda:LOCAL_RANK); cuda_devices:
    the visible count (default: this process's).

    Rank 0's address: MASTER_ADDR when set (deepspeed/torchrun set it; slurm/soft.sbatch exports it).
    One process needs nobody's address: 127.0.0.1 and MASTER_PORT, or a free port. Otherwise
    MASTER_ADDR is left out and DeepSpeed asks MPI (mpi4py) for rank 0's address, as under mpirun
    or srun --mpi=pmix; plain srun cannot start MPI without PMIx, so that is a LaunchError.
    Every rank must agree on the port: with more than one process it is MASTER_PORT or 29500.
    """
    cuda_devices = visible_cuda_devices() if cuda_devices is None else cuda_devices
    device = cuda_device_index(place.local_rank, cuda_devices) if cuda_devices else place.local_rank
    environment = {"RANK": str(place.rank), "LOCAL_RANK": str(device), "WORLD_SIZE": str(place.world_size)}
    port = environ.get("MASTER_PORT")
    if "MASTER_ADDR" in environ:
        environment["MASTER_ADDR"] = environ["MASTER_ADDR"]
    elif place.world_size == 1:
        environment["MASTER_ADDR"] = "127.0.0.1"
        port = port or str(pick_port())
    elif place.launcher == "srun" and "PMIX_RANK" not in environ:
        # DeepSpeed would ask MPI for rank 0's address, and MPI cannot start under srun without PMIx.
        raise LaunchError("srun without --mpi=pmix needs MASTER_ADDR (the first node of the job) and MASTER_PORT "
                          "in the environment; slurm/soft.sbatch sets both")
    environment["MASTER_PORT"] = port or str(DEFAULT_PORT)
    return environment


def init_distributed(backend: str | None = None, environment: dict[str, str] | None = None) -> None:
    """Start torch.distributed through DeepSpeed (the accelerator's backend by default: NCCL on
    GPUs, gloo on CPU) and release DeepSpeed's CPU shared-memory segment.

    `environment` (deepspeed_environment's) goes into os.environ first; None: the launcher set
    every variable (the deepspeed launcher). With all five set DeepSpeed does not look for MPI;
    without MASTER_ADDR it asks MPI for the address (its port stays MASTER_PORT).

    On CPU, when every rank is on one machine, DeepSpeed maps a 69 MB segment per rank,
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>, and never unlinks it: each
    run would leave its segments behind until /dev/shm (RAM) fills. Once every rank has mapped
    every peer's segment (DeepSpeed's initialisation does that before returning, hence the
    barrier), the names can go: the mappings live on until the processes exit.
    """
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator
    os.environ.update(environment or {})
    if torch.cuda.is_available():
        # Before the process group starts: NCCL binds each rank to the current device, and until
        # DeepSpeed's engine exists (the tied weights' first broadcast runs before it) every rank
        # would otherwise work on cuda:0.
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend=backend or get_accelerator().communication_backend_name(),
                               distributed_port=int(os.environ.get("MASTER_PORT", DEFAULT_PORT)))
    segment = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
               f"{os.environ.get('MASTER_PORT', '')}_{torch_dist.get_rank()}")
    if os.path.exists(segment):
        torch_dist.barrier()
        os.unlink(segment)


def device_type() -> str:
    """The device DeepSpeed's accelerator computes on: "cuda", or "cpu" (DS_ACCELERATOR=cpu, or no GPU)."""
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name()


def device_line(place: DistributedEnv) -> str:
    """Where this rank computes, for the start line: its CUDA device and how it was mapped."""
    if not torch.cuda.is_available():
        return "CPU"
    index = torch.cuda.current_device()
    return (f"rank 0 on cuda:{index} ({torch.cuda.get_device_name(index)}) of {torch.cuda.device_count()} visible "
            f"to it (local rank {place.local_rank})")
