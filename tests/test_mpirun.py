"""soft_ds/train.py under Open MPI's `mpirun` instead of the deepspeed launcher: ranks come from
mpirun's variables (validation and logging see them before any distributed work), and DeepSpeed's
MPI discovery (mpi4py) finds rank 0's address, since MASTER_ADDR is not set. A real tiny run,
pipeline 2 x data parallel 2 on CPU ranks."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, check_debug_run_first_step, free_port, scalars

EXITS = [2, 4, 6, 8]
SEED = 7
RUN = ["--ds_config", "ds_configs/tiny_pp2.json", "--model", "debug", "--seq_len", 128, "--micro_batch_size", 2,
       "--grad_accum", 2, "--train_steps", 2, "--warmup_steps", 1, "--val_size", 0, "--log_interval", 1,
       "--seed", SEED]


def mpi_missing() -> str | None:
    if not shutil.which("mpirun"):
        return "mpirun not found (Debian: apt-get install openmpi-bin libopenmpi-dev; tools/test.sh does as root)"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py not installed (pip install -e '.[cluster]')"
    return None


pytestmark = pytest.mark.skipif(mpi_missing() is not None, reason=mpi_missing() or "")


def mpirun(num_procs, *args, timeout=600) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("MASTER_ADDR", "RANK", "LOCAL_RANK",
                                                                           "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MASTER_PORT=str(free_port()))
    cmd = ["mpirun", "-np", str(num_procs), "--allow-run-as-root", "--oversubscribe", "--bind-to", "none",
           sys.executable, "soft_ds/train.py", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_mpirun_trains_pipeline_2_by_data_parallel_2(tmp_path):
    result = mpirun(4, *RUN, "--output_dir", tmp_path / "run")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    # Rank-aware logging: the header once, from rank 0, with the world size mpirun gave.
    assert log.count("SoFT (soft) | exits [2, 4, 6, 8]") == 1, log[-6000:]
    assert "2 stages x 2 data parallel | train batch 8" in log
    assert "step 2/2 | loss" in log

    meta = json.load(open(tmp_path / "run" / "checkpoints" / "step2" / "soft_meta.json"))
    assert meta["step"] == 2 and meta["pipeline_stages"] == 2 and meta["data_parallel"] == 2
    tags = scalars(tmp_path / "run")
    for layer in EXITS:
        assert sorted(tags[f"train/exit_{layer}/loss"]) == [1, 2]

    check_debug_run_first_step(tmp_path / "run", EXITS, SEED, seq_len=128, micro_batch=2, grad_accum=2,
                               data_parallel=2)


def test_mpirun_validation_sees_the_world_size(tmp_path):
    """Validation runs before distributed init, on mpirun's variables: 4 processes cannot form
    3 pipeline stages, said once (by rank 0), nothing written."""
    result = mpirun(4, *RUN, "--pipeline_stages", 3, "--output_dir", tmp_path / "run", timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0
    assert len(errors) == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "world size 4 is not divisible by pipeline_stages=3" in errors[0], errors[0]
    assert not (tmp_path / "run").exists()
