"""The SFT+ICT early-exit baseline (`--mode ict`): on the real pipeline (2 stages), a separate
norm + head per exit trains on a frozen model; the model's weights come out bit-identical, the
heads start as copies of the model's head (so the first step's per-exit losses equal the frozen
model's own exits), and the export keeps the heads so every exit evaluates like a SoFT exit."""

import json
import os

import pytest
import torch

from conftest import REPO, deepspeed_launch, first_step_exit_losses, run_cli, scalars
from test_train_errors import run_validation

HEADS, LAST = [2, 4, 6], 8
SEQ_LEN, MICRO, ACCUM, SEED, STEPS, VAL = 128, 2, 2, 3, 3, 32


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A frozen "SFT" model: a random 8-layer LLaMA checkpoint with the bundled tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAST, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=4096)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sft") / "ckpt"
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ict_run(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("ict") / "run"
    result = deepspeed_launch(
        2, "soft_ds/train.py", "--ds_config", "ds_configs/tiny_pp2.json", "--mode", "ict", "--model", base,
        "--tokenizer", "data/tokenizer", "--exits", "2,4,6,8", "--seq_len", SEQ_LEN, "--micro_batch_size", MICRO,
        "--grad_accum", ACCUM, "--train_steps", STEPS, "--warmup_steps", 0, "--lr", 1e-2, "--val_size", VAL,
        "--seed", SEED, "--log_interval", 1, "--output_dir", out)
    return out, result.stdout + result.stderr


def test_only_the_exit_heads_train(base, ict_run):
    from soft_ds.checkpoint import read_training_checkpoint
    from soft_ds.hf_io import load_tensors
    state, _, meta = read_training_checkpoint(ict_run[0])
    before = load_tensors(base, [name for name in state if not name.startswith("exit_heads.")])
    for name, tensor in before.items():
        assert torch.equal(state[name], tensor), f"{name} changed: the model must stay frozen"
    for n in HEADS:
        for local, shared in (("norm.weight", "model.norm.weight"), ("lm_head.weight", "lm_head.weight")):
            assert not torch.equal(state[f"exit_heads.{n}.{local}"], before[shared]), f"exit {n}'s {local} did not train"
    assert sorted({name.split(".")[1] for name in state if name.startswith("exit_heads.")}) == ["2", "4", "6"]
    assert [layer for layer, _ in meta["exits"]] == [*HEADS, LAST]


def test_first_step_losses_are_the_frozen_models_exits(base, ict_run):
    """The heads start as the model's head, so step 1's loss at exit n is the SFT model's exit n."""
    from soft_ds.data.tokenizer import load_tokenizer
    from soft_ds.hf_io import load_model
    tokenizer = load_tokenizer(os.path.join(REPO, "data", "tokenizer"))
    expected = first_step_exit_losses(load_model(base), [*HEADS, LAST], tokenizer,
                                      os.path.join(REPO, "data", "alpaca_5000.json"), SEQ_LEN, VAL, MICRO, ACCUM, 1, SEED)
    logged = scalars(ict_run[0])
    for n, value in expected.items():
        assert logged[f"train/exit_{n}/loss"][1] == pytest.approx(value, abs=1e-5)
    # The training loss is the mean over the heads only; the frozen last layer has weight 0.
    assert logged["train/loss"][1] == pytest.approx(sum(expected[n] for n in HEADS) / len(HEADS), abs=1e-5)
    # The heads learn; the frozen last layer cannot.
    assert logged[f"train/exit_{HEADS[0]}/loss"][STEPS] < logged[f"train/exit_{HEADS[0]}/loss"][1]


def test_reports_the_extra_parameters(ict_run):
    out, log = ict_run
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["extra_parameters"] == len(HEADS) * 64 * (4096 + 1)
    assert f"{summary['extra_parameters']:,} parameters beyond the model's" in log
    assert [row["exit"] for row in summary["exits"]] == [*HEADS, LAST]
    assert all(row["val_loss"] > 0 for row in summary["exits"])


def test_export_keeps_the_heads_and_exit_exports_use_their_own(ict_run, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    from soft_ds.checkpoint import read_training_checkpoint
    from soft_ds.hf_io import EXIT_HEADS_FILE, load_model
    state, _, _ = read_training_checkpoint(ict_run[0])
    for args in (["--out", tmp_path / "full"], ["--exit", 4, "--out", tmp_path / "exit4"]):
        exported = run_cli(capsys, "export", "--run", ict_run[0], *args)
        assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "full" / EXIT_HEADS_FILE).is_file()
    assert not (tmp_path / "exit4" / EXIT_HEADS_FILE).exists()

    model = load_model(tmp_path / "full")
    ids = torch.randint(3, 4096, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.hidden_states(ids, [4])[4]
        norm = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)
        by_hand = (norm * state["exit_heads.4.norm.weight"]) @ state["exit_heads.4.lm_head.weight"].T
        assert torch.allclose(model(ids, exit_layer=4), by_hand, atol=1e-5)
        # The exported 4-layer directory is exit 4 with its own head, for plain transformers.
        hf = LlamaForCausalLM.from_pretrained(tmp_path / "exit4").eval()
        assert torch.allclose(hf(ids).logits, model(ids, exit_layer=4), atol=1e-5)
        # The last layer keeps the model's head.
        assert torch.allclose(model(ids), model.lm_head(model.model.norm(model.hidden_states(ids, [LAST])[LAST])))


def test_ict_needs_a_checkpoint_and_a_head_on_every_stage(base, tmp_path):
    common = ["--ds_config", "ds_configs/tiny_pp2.json", "--mode", "ict", "--seq_len", SEQ_LEN, "--val_size", VAL,
              "--output_dir", tmp_path / "out"]
    error = run_validation([*common, "--model", "debug"])
    assert "checkpoint directory" in error and "debug" in error
    error = run_validation([*common, "--model", base, "--tokenizer", "data/tokenizer", "--exits", "2,8"])
    assert "stage 1" in error and "no exit head" in error
    error = run_validation([*common, "--model", base, "--tokenizer", "data/tokenizer", "--exits", "8"])
    assert "at least one exit" in error
    assert not (tmp_path / "out").exists()
