"""Every bad input stops soft_ds/train.py with one clear error before any distributed work starts,
and nothing is written. Validation runs before `init_distributed`, so these cases run train.py as
one process with the launcher's environment (WORLD_SIZE, RANK); one case goes through the real
`deepspeed` launcher to show the error is printed once, not once per rank."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, deepspeed_launch

BASE = ["--ds_config", "ds_configs/tiny_pp2.json", "--model", "debug", "--seq_len", 128, "--val_size", 32]


def run_validation(args, world_size=2) -> str:
    """Run train.py expecting a validation error; return that error (asserting it is the only output line)."""
    env = {**os.environ, "WORLD_SIZE": str(world_size), "RANK": "0", "LOCAL_RANK": "0"}
    result = subprocess.run([sys.executable, "soft_ds/train.py", *map(str, args)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


def write(path, text):
    path.write_text(text)
    return path


@pytest.fixture
def tiny_hf_checkpoint(tmp_path):
    """A real Hugging Face LLaMA checkpoint with a 512-token vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=512)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_missing_data_file(tmp_path):
    error = run_validation([*BASE, "--data", tmp_path / "nope.json", "--output_dir", tmp_path / "out"])
    assert "nope.json" in error
    assert not (tmp_path / "out").exists()


def test_malformed_data_file(tmp_path):
    data = write(tmp_path / "bad.json", '[{"instruction": "a", "output": "b"},\n {"instruction": ')
    error = run_validation([*BASE, "--data", data, "--output_dir", tmp_path / "out"])
    assert "bad.json" in error and "JSON" in error
    assert not (tmp_path / "out").exists()


def test_record_without_output(tmp_path):
    records = [{"instruction": f"say {i}", "output": str(i)} for i in range(50)]
    del records[7]["output"]
    data = write(tmp_path / "records.json", json.dumps(records))
    error = run_validation([*BASE, "--data", data, "--output_dir", tmp_path / "out"])
    assert "records.json" in error and "7" in error and "output" in error


def test_exit_beyond_depth(tmp_path):
    error = run_validation([*BASE, "--exits", "2,4,9", "--output_dir", tmp_path / "out"])
    assert "[9]" in error and "1..8" in error


def test_exits_not_alignable_to_pipeline(tmp_path):
    error = run_validation([*BASE, "--exits", "4,8", "--pipeline_stages", 4, "--output_dir", tmp_path / "out"],
                           world_size=4)
    assert "4 pipeline stages cannot be aligned to exits [4, 8]" in error and "<= 2" in error


def test_batch_sizes_that_do_not_multiply_out(tmp_path):
    config = json.load(open(os.path.join(REPO, "ds_configs", "tiny_pp2.json")))
    config["train_batch_size"] = 99
    path = write(tmp_path / "ds.json", json.dumps(config))
    error = run_validation(["--ds_config", path, "--model", "debug", "--output_dir", tmp_path / "out"], world_size=4)
    micro, accum = config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]
    assert "train_batch_size=99" in error and f"{micro} x gradient accumulation {accum} x data parallel 2" in error


def test_world_size_not_multiple_of_stages(tmp_path):
    error = run_validation([*BASE, "--output_dir", tmp_path / "out"], world_size=3)
    assert "world size 3 is not divisible by pipeline_stages=2" in error


def test_checkpoint_that_is_not_llama(tmp_path):
    ckpt = tmp_path / "gpt2"
    ckpt.mkdir()
    write(ckpt / "config.json", json.dumps({"model_type": "gpt2", "n_layer": 2}))
    write(ckpt / "model.safetensors", "")
    error = run_validation([*BASE, "--model", ckpt, "--tokenizer", "data/tokenizer", "--output_dir", tmp_path / "out"])
    assert "gpt2" in error and str(ckpt) in error


def test_model_that_is_neither_dir_nor_preset(tmp_path):
    error = run_validation([*BASE, "--model", "llama-13b", "--output_dir", tmp_path / "out"])
    assert "'llama-13b' is neither a checkpoint directory nor a preset" in error


def test_tokenizer_vocabulary_mismatch(tmp_path, tiny_hf_checkpoint):
    error = run_validation([*BASE, "--model", tiny_hf_checkpoint, "--tokenizer", "data/tokenizer",
                            "--exits", "2,4", "--output_dir", tmp_path / "out"])
    assert "4096 tokens but the model's vocabulary is 512" in error


def test_chat_template_without_one_in_the_tokenizer(tmp_path):
    # The bundled SentencePiece tokenizer has no chat template.
    error = run_validation([*BASE, "--template", "chat", "--output_dir", tmp_path / "out"])
    assert error.startswith("error: template 'chat' needs a tokenizer with a chat template")
    assert not (tmp_path / "out").exists()


def test_unknown_config_key(tmp_path):
    config = json.load(open(os.path.join(REPO, "ds_configs", "tiny_pp2.json")))
    config["soft"]["exit_layers"] = [2, 4]
    path = write(tmp_path / "ds.json", json.dumps(config))
    error = run_validation(["--ds_config", path, "--output_dir", tmp_path / "out"])
    assert "exit_layers" in error


def test_error_printed_once_through_the_launcher(tmp_path):
    result = deepspeed_launch(2, "soft_ds/train.py", *BASE, "--exits", "2,4,9", "--output_dir", tmp_path / "out",
                              check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count("error: exit(s) [9] out of range for the model: it has 8 layers") == 1
    assert "Traceback" not in output
    assert not (tmp_path / "out").exists()


def test_exit_loss_override_needs_chunks(tmp_path):
    """--exit_loss overrides the config's; the fused loss over a config's 0-token chunks is refused."""
    error = run_validation(["--ds_config", "ds_configs/reproduce_small.json", "--model", "debug",
                            "--output_dir", tmp_path / "run", "--exit_loss", "fused"])
    assert "exit_chunk_tokens=0: the fused exit loss works in chunks of counted tokens" in error
    assert not (tmp_path / "run").exists()


def test_train_epochs_become_whole_steps_of_the_tokenized_split(tmp_path):
    """--train-epochs N: train_steps becomes the steps N passes over the training rows take, fixed
    once the data is tokenized (so a warm-up longer than that is refused then)."""
    import math

    from soft_ds import train
    from soft_ds.config import ConfigError
    from soft_ds.data import packing, records

    data = tmp_path / "data.json"
    data.write_text(json.dumps(records.load_records(records.BUNDLED_RECORDS)[:300]))
    common = [*map(str, BASE), "--data", str(data), "--pipeline-stages", "1", "--warmup-steps", "0",
              "--output-dir", str(tmp_path / "run")]
    prepared = train.prepare(train.parse_args([*common, "--train-epochs", "1.5"]), world_size=2)
    rows = packing.epoch_rows(len(prepared.train_set), prepared.soft.seed, 0, prepared.lengths, 128)
    assert prepared.soft.train_steps == math.ceil(1.5 * len(rows) / (1 * 4 * 2)) < 100  # micro 1 x accum 4 x dp 2
    with pytest.raises(ConfigError, match=r"train_epochs 0.1 makes 4 steps: warmup_steps=30 exceeds train_steps=4"):
        train.prepare(train.parse_args([*common, "--train-epochs", "0.1", "--warmup-steps", "30"]), world_size=2)
