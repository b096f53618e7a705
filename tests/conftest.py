import glob
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_cli() -> str:
    """The `deepspeed` launcher of the interpreter running the tests (a virtualenv's, if any)."""
    beside = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return beside if os.path.exists(beside) else "deepspeed"


def deepspeed_launch(num_procs: int, script: str, *args, timeout=600, check=True) -> subprocess.CompletedProcess:
    """Run `deepspeed --num_gpus N script args` (CPU ranks on this machine) and return the result."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    port = free_port()
    cmd = [deepspeed_cli(), "--num_gpus", str(num_procs), "--master_port", str(port), script, *map(str, args)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    if result.returncode == 0:
        # pipe.init_distributed unlinks DeepSpeed's CPU shared-memory segments (69 MB per rank).
        leaked = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
        assert not leaked, f"shared-memory segments left behind: {leaked}"
    return result


@pytest.fixture(scope="session")
def python():
    return sys.executable
