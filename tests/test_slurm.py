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

from conftest import REPO, check_debug_run_first_step, logged_steps, scalars

SOFT_13B = os.path.join(REPO, "slurm", "soft_13b.sh")
SOFT_SBATCH = os.path.join(REPO, "slurm", "soft.sbatch")
EXITS = [2, 4, 6, 8]
SEED = 7
STEPS = 20
# The debug preset at a fraction of a second per step; a checkpoint every 3 steps for the requeues.
TINY_RUN = ["--seq_len", "128", "--micro_batch_size", "2", "--grad_accum", "2", "--train_steps", str(STEPS),
            "--warmup_steps", "1", "--val_size", "0", "--log_interval", "1", "--save_interval", "3",
            "--seed", str(SEED)]


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
    launch, *settings = result.stdout.splitlines()
    assert shlex.split(launch) == [
        "env", "MASTER_ADDR=gpu001", "MASTER_PORT=29512",
        "srun", "--nodes=4", "--ntasks-per-node=8", "--kill-on-bad-exit=1",
        "python3", f"{REPO}/soft_ds/train.py", "--ds-config", f"{REPO}/ds_configs/pp{stages}.json",
        "--model", "/models/Llama-2-13b-hf", "--data", paths_13b["DATA"], "--output-dir", "/shared/runs/soft-13b",
        "--resume", "--lr", "1e-5"]
    # The time limit, the warning signal and the requeueing, as submitted.
    assert settings == [
        "# on exit 75 (stopped to be continued): scontrol requeue 4242, at most 10 times in all (SOFT_MAX_REQUEUES); "
        "restarts so far: 0",
        "#SBATCH --open-mode=append", "#SBATCH --time=24:00:00", "#SBATCH --requeue", "#SBATCH --signal=USR1@300"]
    assert result.stderr == ""


@needs_scontrol
def test_a_requeued_start_resumes_and_the_requeue_limit_is_set(tmp_path, paths_13b):
    env = slurm_batch_env(tmp_path, 4, 8, "gpu[001-004]", MASTER_PORT="29512", SLURM_RESTART_COUNT="2",
                          SOFT_MAX_REQUEUES="3", **paths_13b)
    launch, rule, *sbatch_lines = run_script(SOFT_13B, env, "--lr", "1e-5").stdout.splitlines()
    assert shlex.split(launch)[-3:] == ["--resume", "--lr", "1e-5"]
    assert rule.endswith("at most 3 times in all (SOFT_MAX_REQUEUES); restarts so far: 2")
    # soft.sbatch submitted alone shows its own settings (no time limit: the cluster's default).
    env["SOFT_CONFIG"] = "ds_configs/pp4.json"
    launch, rule, *sbatch_lines = run_script(SOFT_SBATCH, env).stdout.splitlines()
    assert shlex.split(launch)[-1] == "--resume"
    assert sbatch_lines == ["#SBATCH --open-mode=append", "#SBATCH --requeue", "#SBATCH --signal=USR1@300"]


@needs_scontrol
def test_dry_run_picks_a_free_port_and_passes_the_tokenizer(tmp_path, paths_13b):
    env = slurm_batch_env(tmp_path, 4, 8, "gpu[001-004]", TOKENIZER="/models/my tokenizer", **paths_13b)
    argv = shlex.split(run_script(SOFT_13B, env).stdout.splitlines()[0])
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
    (SOFT_13B, {"SOFT_MAX_REQUEUES": "-1"}, "SOFT_MAX_REQUEUES=-1: not a number of requeues (0: never requeue)"),
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


def submit(slurm, args, env, output_dir) -> str:
    """sbatch; the job's id. Its output goes to <output_dir>/job-<id>.out."""
    submitted = slurm.run("sbatch", "--parsable", f"--output={output_dir}/job-%j.out", *args, env=env, cwd=REPO,
                          timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0]


def job_state(slurm, job_id, output_dir) -> tuple[dict, str]:
    """({field: value} of `scontrol show job`, the job's output so far)."""
    shown = slurm.run("scontrol", "show", "job", job_id, timeout=30).stdout
    output = os.path.join(output_dir, f"job-{job_id}.out")
    log = open(output, errors="replace").read() if os.path.exists(output) else f"({output} missing)"
    return dict(re.findall(r"(\w+)=(\S+)", shown)), log


def wait_for(slurm, job_id, output_dir, what, condition, timeout=300) -> tuple[dict, str]:
    """Poll the job each half second until condition(fields, log) holds; its (fields, log) then."""
    deadline = time.time() + timeout
    while True:
        job, log = job_state(slurm, job_id, output_dir)
        if condition(job, log):
            return job, log
        if time.time() > deadline or job.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            slurm.run("scancel", job_id, timeout=30)
            pytest.fail(f"job {job_id}: no {what} after {timeout} s (state {job.get('JobState')})\n{log[-6000:]}")
        time.sleep(0.5)


def finish(slurm, job_id, output_dir, timeout=600) -> tuple[dict, str]:
    """Poll squeue each second until the job has left it (sbatch --wait returns tens of seconds
    late; a requeued job is back in the queue), then its (fields, log)."""
    deadline = time.time() + timeout
    while slurm.run("squeue", "-h", "-j", job_id, timeout=30).stdout.strip():
        if time.time() > deadline:
            slurm.run("scancel", job_id, timeout=30)
            pytest.fail(f"job {job_id} still running after {timeout} s")
        time.sleep(1)
    return job_state(slurm, job_id, output_dir)


def train_env(run, **extra) -> dict:
    """The job's environment for TINY_RUN into `run` through slurm/soft.sbatch."""
    return job_env(**{"SOFT_CONFIG": "ds_configs/tiny_pp2.json", "MODEL": "debug", "DATA": "data/alpaca_5000.json",
                      "OUTPUT_DIR": str(run), "PYTHON": sys.executable, **extra})


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory):
    """TINY_RUN trained by one job from start to end: the reference of every interrupted run."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    job_id = submit(slurm, ["--nodes=2", "--ntasks-per-node=2", SOFT_SBATCH, *TINY_RUN], train_env(folder / "run"),
                    folder)
    job, log = finish(slurm, job_id, folder)
    return folder / "run", job, log


def test_sbatch_trains_on_two_nodes(uninterrupted):
    run, job, log = uninterrupted
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "0"), log[-6000:]
    assert job["NodeList"] == "node[1-2]" and job["NumTasks"] == "4"
    assert log.count("SoFT (soft) | exits [2, 4, 6, 8]") == 1, log[-6000:]
    assert "2 stages x 2 data parallel | train batch 8" in log
    assert f"soft.sbatch: job {job['JobId']}, start 1 (restarts: 0; on exit 75" in log

    meta = json.load(open(run / "checkpoints" / f"step{STEPS}" / "soft_meta.json"))
    assert meta["step"] == STEPS and meta["pipeline_stages"] == 2 and meta["data_parallel"] == 2
    assert [row["exit"] for row in json.load(open(run / "summary.json"))["exits"]] == EXITS
    tags = scalars(run)
    for layer in EXITS:
        assert sorted(tags[f"train/exit_{layer}/loss"]) == list(range(1, STEPS + 1))
        assert sorted(tags[f"train/exit_{layer}/ppl"]) == list(range(1, STEPS + 1))

    check_debug_run_first_step(run, EXITS, SEED, seq_len=128, micro_batch=2, grad_accum=2, data_parallel=2)


# --- time limits, preemption, requeue ------------------------------------------------------------

def slowed_python(tmp_path) -> str:
    """An interpreter for the job's PYTHON that runs train.py through tests/_slow_steps.py."""
    wrapper = tmp_path / "python-slow-steps"
    wrapper.write_text(f'#!/bin/sh\ncase $1 in *train.py) exec {sys.executable} {REPO}/tests/_slow_steps.py '
                       f'"$@" ;; esac\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def check_same_losses(run, reference, last_step):
    """Steps 1..last_step logged once each (none repeated, none missing), and every exit's loss,
    the SoFT loss and the learning rate of each equal to the uninterrupted run's."""
    assert logged_steps(run) == list(range(1, last_step + 1))
    got, expected = scalars(run), scalars(reference)
    for tag in ["train/loss", "train/lr"] + [f"train/exit_{n}/loss" for n in EXITS]:
        assert got[tag] == {step: expected[tag][step] for step in range(1, last_step + 1)}, tag


def test_a_time_limit_stops_saves_requeues_and_the_run_finishes(slurm, tmp_path, uninterrupted):
    """(a) A one-minute job, warned by SIGUSR1: train.py saves the step every rank agreed on and
    exits 75, soft.sbatch requeues the job, the requeued start resumes (nobody added --resume)
    and finishes; per-step losses equal the uninterrupted run's. Slurm checks limits on a
    30-second clock and signals up to 60 s early, so a 1 s margin signals 29-59 s into the job,
    once the start-up has set the handler (train.py's first act; a signal during the rest of the
    start-up stops the run after step 1); the kill comes a minute after the limit (the test
    cluster's OverTimeLimit). The first start's steps sleep 2.5 s (_slow_steps.py) so that
    training is still going when the signal comes. The requeued start gets a longer limit: its
    own warning would come within its start-up and stop it again after one step."""
    run = tmp_path / "run"
    job_id = submit(slurm, ["--nodes=2", "--ntasks-per-node=2", "--time=1", "--signal=USR1@1", SOFT_SBATCH,
                            *TINY_RUN], train_env(run, PYTHON=slowed_python(tmp_path), SLOW_STEPS="2.5"), tmp_path)
    wait_for(slurm, job_id, tmp_path, "requeue", lambda job, log: job.get("Restarts") == "1", timeout=150)
    assert slurm.run("scontrol", "update", f"JobId={job_id}", "TimeLimit=10", timeout=30).returncode == 0
    job, log = finish(slurm, job_id, tmp_path)

    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-6000:]
    stopped = int(re.search(r"stop requested \(SIGUSR1\): saving step (\d+), then exiting with 75", log).group(1))
    assert 1 <= stopped < STEPS and "DUE TO TIME LIMIT" not in log, log[-6000:]
    assert f"soft.sbatch: training stopped to be continued (exit 75): requeueing job {job_id} " \
           f"(requeue 1 of at most 10)" in log
    assert f"soft.sbatch: job {job_id}, start 2 (restarts: 1;" in log
    assert f"resumed from step {stopped}" in log and log.count("Per-exit results") == 1
    check_same_losses(run, uninterrupted[0], STEPS)


def test_a_requeue_without_warning_resumes_from_the_last_checkpoint_and_the_limit_holds(slurm, tmp_path,
                                                                                       uninterrupted):
    """(b) `scontrol requeue` while step 5 runs, a kill without warning: its SIGTERM comes
    KillWait (5 s) before the SIGKILL and step 5 is held far longer, so no save can happen. The
    requeued start resumes from step 3, the last periodic checkpoint, and step 4, logged by both
    starts, shows once with the same losses. (c) With SOFT_MAX_REQUEUES=1 that requeue was the
    last: a SIGUSR1 (`scancel --signal`, a time limit's warning by hand) then stops the run, which
    saves, exits 75 and is not requeued again."""
    run = tmp_path / "run"
    env = train_env(run, PYTHON=slowed_python(tmp_path), SOFT_MAX_REQUEUES="1", SLOW_STEP_AT="5:300",
                    SLOW_STEPS_AFTER_REQUEUE="0.5")
    job_id = submit(slurm, ["--nodes=2", "--ntasks-per-node=2", SOFT_SBATCH, *TINY_RUN], env, tmp_path)
    wait_for(slurm, job_id, tmp_path, "step 4", lambda job, log: "step 4/" in log)
    assert slurm.run("scontrol", "requeue", job_id, timeout=30).returncode == 0
    wait_for(slurm, job_id, tmp_path, "step 6 after the requeue",
             lambda job, log: "step 6/" in log.partition("resumed from step")[2])
    assert slurm.run("scancel", "--signal=USR1", job_id, timeout=30).returncode == 0
    job, log = finish(slurm, job_id, tmp_path)

    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "75:0", "1"), log[-6000:]
    assert "DUE TO JOB REQUEUE" in log and "resumed from step 3" in log, log[-6000:]
    stopped = int(re.search(r"stop requested \(SIGUSR1\): saving step (\d+)", log).group(1))
    assert 6 <= stopped < STEPS
    assert (run / "checkpoints" / "latest").read_text() == f"step{stopped}"
    assert f"job {job_id} has been requeued 1 times, the limit (SOFT_MAX_REQUEUES=1): not requeueing" in log
    assert "requeueing job" not in log  # the one requeue was scontrol's
    check_same_losses(run, uninterrupted[0], stopped)


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
