"""soft_ds.preemption: a stop signal is noted, not obeyed on the spot; every rank agrees to stop
when any rank was signalled; the handlers are handed back afterwards (ignored on the way out with
exit code 75); and a signal that lands in the middle of a checkpoint save lets the save finish,
then stops the run after the next step with both checkpoints complete. (Stops of real multi-node
jobs by Slurm's time-limit signal, requeue and resume: test_slurm.py.)"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch.multiprocessing

from conftest import REPO, logged_steps
from soft_ds.preemption import EXIT_TO_BE_CONTINUED, STOP_SIGNALS, StopRequest


def test_a_signal_is_noted_and_the_handlers_come_back():
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    with StopRequest() as stop:
        assert stop.received is None
        os.kill(os.getpid(), signal.SIGUSR1)  # would end the process without the handler
        assert stop.received == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == "SIGTERM"
    assert {signum: signal.getsignal(signum) for signum in STOP_SIGNALS} == before


def test_leaving_to_be_continued_ignores_further_stop_signals():
    """srun SIGTERMs the ranks still shutting down once one has exited with 75: that must not
    turn their exit code 75 into a death by signal."""
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        with pytest.raises(SystemExit) as leaving:
            with StopRequest():
                raise SystemExit(EXIT_TO_BE_CONTINUED)
        assert leaving.value.code == 75
        assert all(signal.getsignal(signum) is signal.SIG_IGN for signum in STOP_SIGNALS)
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def _agree(rank, world_size, store_file, signalled_ranks, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank,
                                         world_size=world_size)
    with StopRequest() as stop:
        first = stop.agreed("cpu")  # nobody signalled yet
        if rank in signalled_ranks:
            os.kill(os.getpid(), signal.SIGUSR1)
        results[rank] = (first, stop.agreed("cpu"))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("signalled_ranks", [(2,), (0, 1, 2)], ids=["one-rank", "all-ranks"])
def test_every_rank_agrees_when_any_rank_is_signalled(tmp_path, signalled_ranks):
    """Slurm signals every rank but not at one instant; a rank-local decision could let rank 0
    save step N while rank 2 trains step N+1. After the all-reduce, all say the same."""
    world_size = 3
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(_agree, args=(world_size, str(tmp_path / "store"), signalled_ranks, results),
                                nprocs=world_size)
    assert dict(results) == {rank: (False, True) for rank in range(world_size)}


SIGNAL_DURING_SAVE = """
import os, signal, sys
from soft_ds import checkpoint, train
write_atomically = checkpoint._write_atomically
def signal_first(path, text):
    # Step 2's save: every DeepSpeed file is written, the metadata and `latest` are not yet.
    if path.endswith(os.path.join("step2", checkpoint.META_FILE)):
        print("SIGTERM during the step2 save", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
    write_atomically(path, text)
checkpoint._write_atomically = signal_first
train.main(sys.argv[1:])
"""
RUN = ["--ds_config", "ds_configs/tiny_pp2.json", "--model", "debug", "--pipeline_stages", "1", "--seq_len", "128",
       "--micro_batch_size", "2", "--grad_accum", "1", "--train_steps", "6", "--warmup_steps", "1", "--val_size", "0",
       "--log_interval", "1", "--save_interval", "2", "--seed", "7"]


def test_a_signal_during_a_save_lets_it_finish_then_stops_after_the_next_step(tmp_path):
    """One process (no launcher). The save in flight completes; the run stops after step 3,
    saves it, exits with 75; `latest` names step 3, step 2 is complete too, and --resume goes on
    from step 3 to the end with no step logged twice."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env = {key: value for key, value in env.items() if not key.startswith(("SLURM_", "OMPI_"))}
    run = [*RUN, "--output_dir", str(tmp_path)]
    stopped = subprocess.run([sys.executable, "-c", SIGNAL_DURING_SAVE, *run], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    log = stopped.stdout + stopped.stderr
    assert stopped.returncode == EXIT_TO_BE_CONTINUED, log[-4000:]
    assert "SIGTERM during the step2 save" in log and "saved checkpoint step 2" in log
    assert "stop requested (SIGTERM): saving step 3, then exiting with 75 (to be continued)" in log
    assert "stopped at step 3 of 6; continue with --resume" in log and "step 4/6" not in log
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text() == "step3"
    for step in (2, 3):
        assert json.loads((ckpt / f"step{step}" / "soft_meta.json").read_text())["step"] == step

    resumed = subprocess.run([sys.executable, "soft_ds/train.py", *run, "--resume"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert "resumed from step 3" in resumed.stdout
    assert logged_steps(tmp_path) == [1, 2, 3, 4, 5, 6]
