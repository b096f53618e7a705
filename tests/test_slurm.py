"""The Slurm scripts: their dry run prints the exact launch command for 4 nodes x 8 GPUs, bad
input stops them with one error naming the problem, and `sbatch slurm/soft.sbatch` on a real
two-node Slurm (munge, slurmctld and two slurmd on this machine; tests/_slurm_cluster.py) trains
pipeline 2 x data parallel 2 across the two nodes with the first step's losses of a
single-process computation."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO, check_debug_run_first_step, scalars

SOFT_13B = os.path.join(REPO, "slurm", "soft_13b.sh")
SOFT_SBATCH = os.path.join(REPO, "slurm", "soft.sbatch")
EXITS = [2, 4, 6, 8]
SEED = 7
TINY_RUN = ["--seq_len", "128", "--micro_batch_size", "2", "--grad_accum", "2", "--train_steps", "2",
            "--warmup_steps", "1", "--val_size", "0", "--log_interval", "1", "--seed", str(SEED)]


@pytest.mark.parametrize("script", [SOFT_13B, SOFT_SBATCH])
def test_scripts_parse(script):
    result = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- dry runs: the batch scripts run as Slurm runs them, with the environment it sets ------------

needs_scontrol = pytest.mark.skipif(shutil.which("scontrol") is None,
                                    reason="scontrol not found (Debian: slurm-wlm; tools/test.sh installs it as root)")


def slurm_batch_env(tmp_path, nodes, gpus_per_node, nodelist, **extra) -> dict:
    """What Slurm sets in a batch script for `sbatch --nodes N --ntasks-per-node G --gpus-per-node G`
    on the first node, plus the user's variables. scontrol expands the node list; it only needs a
    slurm.conf to read, as on any cluster."""
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=dry\nSlurmctldHost=localhost\n")
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "SLURM_CONF": str(conf),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "soft-13b", "SLURM_JOB_NODELIST": nodelist,
           "SLURM_NODELIST": nodelist, "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NNODES": str(nodes),
           "SLURM_NTASKS": str(nodes * gpus_per_node), "SLURM_NPROCS": str(nodes * gpus_per_node),
           "SLURM_NTASKS_PER_NODE": str(gpus_per_node), "SLURM_TASKS_PER_NODE": f"{gpus_per_node}(x{nodes})",
           "SLURM_GPUS_PER_NODE": str(gpus_per_node), "SLURM_SUBMIT_DIR": REPO, "SLURM_PROCID": "0",
           "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURMD_NODENAME": "gpu001", "SOFT_DRY_RUN": "1"}
    env.update(extra)
    return env


def run_script(script, env, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", script, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.fixture
def paths_13b(tmp_path):
    data = tmp_path / "alpaca_data.json"
    data.write_text("[]")
    return {"MODEL": "/models/Llama-2-13b-hf", "DATA": str(data), "OUTPUT_DIR": "/shared/runs/soft-13b"}


@needs_scontrol
@pytest.mark.parametrize("stages", [4, 8])
def test_13b_dry_run_prints_the_launch_for_4_nodes_of_8_gpus(tmp_path, paths_13b, stages):
    env = slurm_batch_env(tmp_path, 4, 8, "gpu[001-004]", MASTER_PORT="29512", PIPELINE_STAGES=str(stages),
                          **paths_13b)
    result = run_script(SOFT_13B, env, "--resume", "--lr", "1e-5")
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    assert shlex.split(result.stdout) == [
        "env", "MASTER_ADDR=gpu001", "MASTER_PORT=29512",
        "srun", "--nodes=4", "--ntasks-per-node=8", "--kill-on-bad-exit=1",
        "python3", f"{REPO}/soft_ds/train.py", "--ds_config", f"{REPO}/ds_configs/pp{stages}.json",
        "--model", "/models/Llama-2-13b-hf", "--data", paths_13b["DATA"], "--output_dir", "/shared/runs/soft-13b",
        "--resume", "--lr", "1e-5"]
    assert result.stdout.count("\n") == 1 and result.stderr == ""


@needs_scontrol
def test_dry_run_picks_a_free_port_and_passes_the_tokenizer(tmp_path, paths_13b):
    env = slurm_batch_env(tmp_path, 4, 8, "gpu[001-004]", TOKENIZER="/models/my tokenizer", **paths_13b)
    argv = shlex.split(run_script(SOFT_13B, env).stdout)
    assert re.fullmatch(r"MASTER_PORT=\d{4,5}", argv[2]) and 1024 <= int(argv[2].split("=")[1]) < 65536
    assert argv[-2:] == ["--tokenizer", "/models/my tokenizer"]


@needs_scontrol
@pytest.mark.parametrize("script, change, message", [
    (SOFT_13B, {"MODEL": None, "OUTPUT_DIR": None}, "environment variable(s) not set: MODEL OUTPUT_DIR"),
    (SOFT_13B, {"DATA": "/nowhere/alpaca.json"}, "DATA=/nowhere/alpaca.json: no such file"),
    (SOFT_13B, {"PIPELINE_STAGES": "6"}, "PIPELINE_STAGES must be 4 or 8"),
    (SOFT_13B, {"SLURM_JOB_NODELIST": None}, "SLURM_JOB_NODELIST is not set: submit this script with sbatch"),
    (SOFT_13B, {"SLURM_SUBMIT_DIR": "/"}, "no slurm/soft.sbatch in /: submit from the soft-ds checkout"),
    (SOFT_SBATCH, {}, "environment variable(s) not set: SOFT_CONFIG"),
    (SOFT_SBATCH, {"SOFT_CONFIG": "ds_configs/pp5.json"}, "SOFT_CONFIG=ds_configs/pp5.json: no such file"),
    (SOFT_SBATCH, {"SOFT_CONFIG": "ds_configs/pp4.json", "SLURM_NTASKS_PER_NODE": None},
     "submit with --ntasks-per-node=<GPUs per node>"),
])
def test_bad_input_is_one_error_naming_it(tmp_path, paths_13b, script, change, message):
    env = slurm_batch_env(tmp_path, 4, 8, "gpu[001-004]", **paths_13b)
    env = {name: value for name, value in {**env, **change}.items() if value is not None}  # None: unset
    result = run_script(script, env)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr


# --- a real Slurm with two nodes on this machine --------------------------------------------------

def cannot_run_slurm() -> str | None:
    from _slurm_cluster import missing_tools
    if os.geteuid() != 0:
        return "needs root: slurmd runs jobs as their owner and the node names go into /etc/hosts"
    missing = missing_tools()
    if missing:
        return f"missing {', '.join(missing)} (tools/test.sh installs them with apt-get as root)"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory, request):
    reason = cannot_run_slurm()
    if reason:
        pytest.skip(reason)
    from _slurm_cluster import LocalSlurm, ensure_hosts_entries
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        ensure_hosts_entries(cluster.nodes)
    except OSError as e:
        pytest.skip(f"the node names {cluster.nodes} do not resolve and /etc/hosts cannot take them: {e}")
    request.addfinalizer(cluster.stop)
    cluster.start()
    return cluster


def test_hosts_lines_are_appended_never_rewritten(tmp_path):
    from _slurm_cluster import ensure_hosts_entries
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost")  # no final newline: the next line must not join it
    assert ensure_hosts_entries(["localhost", "soft-ds-node.invalid"], str(hosts)) == ["soft-ds-node.invalid"]
    assert hosts.read_text() == "127.0.0.1 localhost\n127.0.0.1 soft-ds-node.invalid  # soft-ds tests: local Slurm node\n"


def job_env(**extra) -> dict:
    """The submitting shell's environment (sbatch exports it to the job), without any outer
    launcher's or job's variables, with this checkout's soft_ds first on the path."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SLURM_", "OMPI_", "PMIX_")) and key not in
           ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def sbatch_and_wait(slurm, args, env, output_dir, timeout=600) -> tuple[dict, str]:
    """Submit, poll squeue each second (sbatch --wait returns tens of seconds late), then read the
    job's state and exit code from scontrol. Returns ({field: value} of the job, its output)."""
    submitted = slurm.run("sbatch", "--parsable", f"--output={output_dir}/job-%j.out", *args, env=env, cwd=REPO,
                          timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    deadline = time.time() + timeout
    while slurm.run("squeue", "-h", "-j", job_id, timeout=30).stdout.strip():
        if time.time() > deadline:
            slurm.run("scancel", job_id, timeout=30)
            pytest.fail(f"job {job_id} still running after {timeout} s")
        time.sleep(1)
    shown = slurm.run("scontrol", "show", "job", job_id, timeout=30).stdout
    output = os.path.join(output_dir, f"job-{job_id}.out")
    log = open(output, errors="replace").read() if os.path.exists(output) else f"({output} missing)"
    return dict(re.findall(r"(\w+)=(\S+)", shown)), log


def test_sbatch_trains_on_two_nodes(slurm, tmp_path):
    run = tmp_path / "run"
    env = job_env(SOFT_CONFIG="ds_configs/tiny_pp2.json", MODEL="debug", DATA="data/alpaca_5000.json",
                  OUTPUT_DIR=str(run), PYTHON=sys.executable)
    job, log = sbatch_and_wait(slurm, ["--nodes=2", "--ntasks-per-node=2", SOFT_SBATCH, *TINY_RUN], env, tmp_path)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log[-6000:]
    assert job["NodeList"] == "node[1-2]" and job["NumTasks"] == "4"
    assert log.count("SoFT (soft) | exits [2, 4, 6, 8]") == 1, log[-6000:]
    assert "2 stages x 2 data parallel | train batch 8" in log

    meta = json.load(open(run / "checkpoints" / "step2" / "soft_meta.json"))
    assert meta["step"] == 2 and meta["pipeline_stages"] == 2 and meta["data_parallel"] == 2
    assert [row["exit"] for row in json.load(open(run / "summary.json"))["exits"]] == EXITS
    tags = scalars(run)
    for layer in EXITS:
        assert sorted(tags[f"train/exit_{layer}/loss"]) == [1, 2]
        assert sorted(tags[f"train/exit_{layer}/ppl"]) == [1, 2]

    check_debug_run_first_step(run, EXITS, SEED, seq_len=128, micro_batch=2, grad_accum=2, data_parallel=2)


WHERE_AM_I = """
import os, socket
from soft_ds.distributed import distributed_env
place = distributed_env()
if os.environ.get("CHECK_MPI_DISCOVERY"):
    from deepspeed.comm.comm import mpi_discovery
    mpi_discovery(distributed_port=29500, verbose=False)  # what train.py's init falls back to
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == tuple(map(str, place[:3]))
print("place", socket.gethostname(), place.rank, place.local_rank, place.world_size, place.launcher, flush=True)
"""


@pytest.mark.parametrize("mpi", ["none", "pmix"])
def test_srun_ranks_are_per_node(slurm, mpi):
    """Each task's rank, local rank and world size as train.py reads them: local ranks restart on
    each node (each slurmd has its own hostname). Under --mpi=pmix, DeepSpeed's MPI discovery
    (mpi4py) agrees with them."""
    if mpi == "pmix":
        from test_mpirun import mpi_missing
        if mpi_missing():
            pytest.skip(mpi_missing())
    result = slurm.run("srun", "--nodes=2", "--ntasks-per-node=2", f"--mpi={mpi}", sys.executable, "-c", WHERE_AM_I,
                       env=job_env(CHECK_MPI_DISCOVERY="1" if mpi == "pmix" else ""), cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    places = sorted(line.split()[1:] for line in result.stdout.splitlines() if line.startswith("place "))
    assert places == [["node1", "0", "0", "4", "srun"], ["node1", "1", "1", "4", "srun"],
                      ["node2", "2", "0", "4", "srun"], ["node2", "3", "1", "4", "srun"]]


def test_srun_without_rendezvous_is_one_clear_error(slurm, tmp_path):
    """Plain srun without MASTER_ADDR: MPI cannot start without PMIx, so train.py says what to set."""
    result = slurm.run("srun", "--nodes=2", "--ntasks-per-node=2", "--mpi=none", sys.executable, "soft_ds/train.py",
                       "--ds_config", "ds_configs/tiny_pp2.json", "--model", "debug", "--output_dir",
                       str(tmp_path / "run"), env=job_env(), cwd=REPO, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "srun without --mpi=pmix needs MASTER_ADDR" in errors[0], result.stderr[-3000:]
    assert not (tmp_path / "run").exists()
