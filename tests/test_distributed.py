"""distributed_env: each launcher's variables give the process's place, the innermost launcher
wins, and an sbatch script's own environment is not mistaken for an srun step.
deepspeed_environment: what DeepSpeed starts from under each launcher, and when MPI is asked.
A run without a launcher trains as one process and never touches MPI. (The real launchers:
test_train.py for deepspeed, test_mpirun.py for mpirun, test_slurm.py for srun.)"""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, soft_ds_command
from soft_ds.distributed import DistributedEnv, LaunchError, deepspeed_environment, distributed_env

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


def environment_for(environ, port=41234):
    return deepspeed_environment(distributed_env(environ), environ, pick_port=lambda: port)


RENDEZVOUS_SET = {"MASTER_ADDR": "gpu001", "MASTER_PORT": "29512"}


@pytest.mark.parametrize("environ, expected", [
    # One process meets itself on this machine, on a free port (or the one asked for): no MPI.
    ({}, {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "41234"}),
    ({"MASTER_PORT": "29512"},
     {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29512"}),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"},
     {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "41234"}),
    # The launcher's (or the batch script's) rendezvous wins.
    ({**DEEPSPEED, **RENDEZVOUS_SET}, {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", **RENDEZVOUS_SET}),
    ({**SRUN_STEP, **RENDEZVOUS_SET}, {"RANK": "13", "LOCAL_RANK": "5", "WORLD_SIZE": "32", **RENDEZVOUS_SET}),
    ({**SRUN_STEP, "MASTER_ADDR": "gpu001"},
     {"RANK": "13", "LOCAL_RANK": "5", "WORLD_SIZE": "32", "MASTER_ADDR": "gpu001", "MASTER_PORT": "29500"}),
    # Under an MPI launcher, no MASTER_ADDR: DeepSpeed asks MPI; every rank uses the same port.
    (MPIRUN, {"RANK": "6", "LOCAL_RANK": "2", "WORLD_SIZE": "8", "MASTER_PORT": "29500"}),
    ({**MPIRUN, "MASTER_PORT": "29512"}, {"RANK": "6", "LOCAL_RANK": "2", "WORLD_SIZE": "8", "MASTER_PORT": "29512"}),
    ({**SRUN_STEP, "PMIX_RANK": "13"}, {"RANK": "13", "LOCAL_RANK": "5", "WORLD_SIZE": "32", "MASTER_PORT": "29500"}),
], ids=["none", "none-port-set", "mpirun-np-1", "deepspeed", "srun-sbatch", "srun-addr-only", "mpirun",
        "mpirun-port-set", "srun-pmix"])
def test_deepspeed_environment(environ, expected):
    assert environment_for(environ) == expected


# srun --gpus-per-task=1 on 8-GPU nodes: each task sees one GPU (CUDA_VISIBLE_DEVICES per task) while
# SLURM_LOCALID goes up to 7.
SRUN_LOCAL_7 = {"SLURM_PROCID": "15", "SLURM_LOCALID": "7", "SLURM_STEP_NUM_TASKS": "16", **RENDEZVOUS_SET}


@pytest.mark.parametrize("visible, device", [(0, "7"), (1, "0"), (8, "7")],
                         ids=["cpu", "one-gpu-per-task", "node-gpus"])
def test_local_rank_maps_to_a_visible_cuda_device(visible, device):
    """DeepSpeed moves its engine and pipeline module to cuda:LOCAL_RANK, so LOCAL_RANK is the
    device this process uses: the only one it sees, or its local rank among a node's."""
    environment = deepspeed_environment(distributed_env(SRUN_LOCAL_7), SRUN_LOCAL_7, cuda_devices=visible)
    assert environment["LOCAL_RANK"] == device and environment["RANK"] == "15"


def test_more_local_ranks_than_visible_gpus_is_a_launch_error():
    with pytest.raises(LaunchError, match="local rank 7 sees 2 CUDA devices.*at most 2 processes per node"):
        deepspeed_environment(distributed_env(SRUN_LOCAL_7), SRUN_LOCAL_7, cuda_devices=2)


def test_cuda_device_is_set_before_the_process_group_starts(monkeypatch):
    """init_distributed selects this rank's GPU before DeepSpeed starts the process group: until
    the engine exists (the tied weights' first broadcast runs before it) every rank would work on
    cuda:0. A stand-in for torch.cuda and deepspeed.init_distributed records the order."""
    import deepspeed
    import torch

    from soft_ds import distributed
    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: events.append(("set_device", index)))
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kwargs: events.append(("init_distributed",)))
    monkeypatch.setattr(distributed.torch_dist, "get_rank", lambda: 0)
    monkeypatch.setattr(os.path, "exists", lambda path: False)  # no CPU shared-memory segment to release
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        # init_distributed writes these into os.environ; set here, they are restored (or removed)
        # after the test, so later tests' processes do not inherit rank 15 of 16.
        monkeypatch.setenv(name, "unset")
    environment = deepspeed_environment(distributed_env(SRUN_LOCAL_7), SRUN_LOCAL_7, cuda_devices=1)
    distributed.init_distributed("nccl", environment)
    assert events == [("set_device", 0), ("init_distributed",)]


def test_srun_without_pmix_or_rendezvous_is_a_launch_error():
    with pytest.raises(LaunchError, match=r"srun without --mpi=pmix needs MASTER_ADDR \(the first node of the job\) "
                                          r"and MASTER_PORT in the environment; slurm/soft.sbatch sets both"):
        environment_for(SRUN_STEP)


def test_a_port_is_picked_only_for_one_process_without_one():
    def no_pick():
        raise AssertionError("picked a port")
    for environ in ({"MASTER_PORT": "29512"}, MPIRUN, {**DEEPSPEED, **RENDEZVOUS_SET}):
        deepspeed_environment(distributed_env(environ), environ, pick_port=no_pick)


# --- no launcher: one process, never MPI -----------------------------------------------------

# Variables a launcher or a job sets; none may reach a launcher-less run, nor mpi4py's own settings.
LAUNCHER_PREFIXES = ("OMPI_", "PMIX_", "PMI_", "SLURM_", "MPI4PY_", "MV2_", "I_MPI_", "HYDRA_")
RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TINY = ["--ds_config", "ds_configs/tiny_pp2.json", "--pipeline_stages", 1, "--model", "debug", "--seq_len", 128,
        "--micro_batch_size", 2, "--grad_accum", 1, "--train_steps", 2, "--warmup_steps", 1, "--val_size", 32,
        "--log_interval", 1]


@pytest.mark.parametrize("command", [[sys.executable, "soft_ds/train.py"], [soft_ds_command(), "train"]],
                         ids=["python-train.py", "soft-ds-train"])
def test_no_launcher_is_one_process_without_mpi(tmp_path, command):
    """A bare `python soft_ds/train.py` (or `soft-ds train`) trains as world size 1 on 127.0.0.1 and
    a free port. MPI is never asked: mpi4py is pointed at a libmpi that does not exist, as on a
    machine with mpi4py installed but no MPI library, where DeepSpeed's MPI discovery dies."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(LAUNCHER_PREFIXES) and key not in RENDEZVOUS}
    env.update(MPI4PY_LIBMPI=str(tmp_path / "no-mpi" / "libmpi.so.40"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([*command, *map(str, TINY), "--output_dir", str(tmp_path / "run")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "1 stages x 1 data parallel" in log and "no launcher, world size 1" in log, log[-6000:]
    assert "Per-exit results" in log and "step 2/2 | loss" in log
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert [row["exit"] for row in summary["exits"]] == [2, 4, 6, 8]
    assert all(row["val_loss"] is not None for row in summary["exits"])


class Collected(Exception):
    """Raised by the recording collective once it has seen its tensor (nothing is reduced)."""


def test_soft_ds_collectives_send_tensors_on_the_module_device(monkeypatch):
    """Every collective soft-ds itself calls gets a tensor on the device it was given (the engine's
    or the module's): NCCL takes CUDA tensors only, and gloo CPU ones. The module is put on the
    meta device, so a tensor built on the CPU by default would show; the collective records the
    device and stops there."""
    from types import SimpleNamespace

    import torch

    from soft_ds.exits import Exit
    from soft_ds.pipe import ExitLossMeter, SoftPipelineModule
    from soft_ds.preemption import StopRequest
    meta = torch.device("meta")
    seen = []

    def record(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise Collected

    monkeypatch.setattr(torch.distributed, "all_reduce", record)
    with pytest.raises(Collected):
        StopRequest().agreed(meta)
    meter = ExitLossMeter()
    meter.add(4, torch.ones((), device=meta))
    module = SimpleNamespace(exits=(Exit(4), Exit(8)), meter=meter, world_group=None,
                             parameters=lambda: iter([torch.nn.Parameter(torch.empty(2, device=meta))]))
    with pytest.raises(Collected):
        SoftPipelineModule.reduce_exit_losses(module)
    assert seen == [meta, meta]
