"""soft_ds/train.py end to end, through the real `deepspeed` launcher on CPU ranks: per-exit
TensorBoard scalars, checkpoints, --resume continuing exactly as an uninterrupted run, and export
to a Hugging Face directory that plain transformers loads."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, deepspeed_launch, first_step_exit_losses, run_cli, scalars

STEPS = 4
EXITS = [2, 4, 6, 8]
PROCS = 4  # 2 pipeline stages x 2 data parallel: ZeRO-1 shards the optimizer state across replicas
# The "debug" preset (hidden 64, 8 layers) with the bundled 4K tokenizer: seconds per step.
COMMON = ["--ds_config", "ds_configs/tiny_pp2.json", "--model", "debug", "--seq_len", 128,
          "--micro_batch_size", 2, "--grad_accum", 2, "--train_steps", STEPS, "--warmup_steps", 1,
          "--val_size", 32, "--eval_interval", 2, "--log_interval", 1, "--save_interval", 2]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = deepspeed_launch(PROCS, "soft_ds/train.py", *COMMON, "--output_dir", out)
    return out, result.stdout + result.stderr


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    out = tmp_path_factory.mktemp("resumed")
    first = deepspeed_launch(PROCS, "soft_ds/train.py", *COMMON, "--output_dir", out, "--stop_at_step", 2)
    second = deepspeed_launch(PROCS, "soft_ds/train.py", *COMMON, "--output_dir", out, "--resume")
    return out, first.stdout + first.stderr, second.stdout + second.stderr


def test_run_prints_progress_and_per_exit_table(straight):
    out, log = straight
    assert f"step {STEPS}/{STEPS} | loss" in log
    table = log[log.index("Per-exit results"):]
    for layer in EXITS:
        assert f"\n{layer:>6} " in table
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert [row["exit"] for row in summary["exits"]] == EXITS
    assert all(row["val_loss"] > 0 and row["train_loss"] > 0 for row in summary["exits"])


def test_tensorboard_has_every_exit(straight):
    tags = scalars(straight[0])
    for layer in EXITS:
        for split in ("train", "val"):
            assert set(tags[f"{split}/exit_{layer}/loss"]) >= {2, 4}
            step, loss = max(tags[f"{split}/exit_{layer}/loss"].items())
            assert tags[f"{split}/exit_{layer}/ppl"][step] == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-5)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss"):
        assert tag in tags
    assert sorted(tags["train/loss"]) == list(range(1, STEPS + 1))
    # The SoFT loss is the mean of the exits' losses, step by step.
    for step, loss in tags["train/loss"].items():
        mean = sum(tags[f"train/exit_{n}/loss"][step] for n in EXITS) / len(EXITS)
        assert loss == pytest.approx(mean, rel=1e-5)


def test_checkpoint_describes_itself_and_holds_the_head_once(straight):
    ckpt = os.path.join(straight[0], "checkpoints")
    meta = json.load(open(os.path.join(ckpt, f"step{STEPS}", "soft_meta.json")))
    assert meta["step"] == STEPS and meta["pipeline_stages"] == 2 and meta["data_parallel"] == 2
    assert [e for e, _ in meta["exits"]] == EXITS
    files = os.listdir(os.path.join(ckpt, f"step{STEPS}"))
    assert files.count("shared_head-model_states.pt") == 1
    # ZeRO-1: one optimizer shard per data-parallel replica and stage.
    assert len([f for f in files if f.endswith("optim_states.pt")]) == 4
    head_copies = 0
    for name in files:
        if name.endswith("model_states.pt") and name.startswith(("layer_", "shared_head")):
            state = torch.load(os.path.join(ckpt, f"step{STEPS}", name), weights_only=True)
            head_copies += "lm_head.weight" in state
    assert head_copies == 1


def test_resume_continues_exactly(straight, resumed):
    out, first, second = resumed
    assert "stopped at step 2" in first and "resumed from step 2" in second
    a, b = scalars(straight[0]), scalars(out)
    for tag in ["train/loss", "train/lr"] + [f"train/exit_{n}/loss" for n in EXITS]:
        assert sorted(b[tag]) == list(range(1, STEPS + 1)), tag
        for step in range(1, STEPS + 1):
            assert b[tag][step] == a[tag][step], (tag, step)
    for n in EXITS:
        assert b[f"val/exit_{n}/loss"][STEPS] == a[f"val/exit_{n}/loss"][STEPS]
    # And the final weights are bit-identical.
    final = os.path.join("checkpoints", f"step{STEPS}")
    for name in sorted(os.listdir(os.path.join(straight[0], final))):
        if name.startswith(("layer_", "shared_head")):
            x = torch.load(os.path.join(straight[0], final, name), weights_only=True)
            y = torch.load(os.path.join(out, final, name), weights_only=True)
            assert all(torch.equal(x[k], y[k]) for k in x), name


def test_existing_run_is_not_overwritten(straight):
    from test_train_errors import run_validation
    out = straight[0]
    before = {f: os.path.getmtime(os.path.join(out, "checkpoints", f)) for f in os.listdir(os.path.join(out, "checkpoints"))}
    message = run_validation([*COMMON, "--output_dir", out], world_size=PROCS)
    assert "already holds checkpoints: pass --resume" in message
    after = {f: os.path.getmtime(os.path.join(out, "checkpoints", f)) for f in os.listdir(os.path.join(out, "checkpoints"))}
    assert before == after


LOAD_WITHOUT_SOFT_DS = """
import sys, json
sys.modules["soft_ds"] = None  # prove the export needs only transformers
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
full_dir, exit_dir, layer = sys.argv[1], sys.argv[2], int(sys.argv[3])
full = AutoModelForCausalLM.from_pretrained(full_dir).eval()
sub = AutoModelForCausalLM.from_pretrained(exit_dir).eval()
tokenizer = AutoTokenizer.from_pretrained(exit_dir)
ids = tokenizer("Give three tips for staying healthy.", return_tensors="pt").input_ids
with torch.no_grad():
    full_logits = full(ids).logits
    sub_logits = sub(ids).logits
torch.save({"ids": ids, "full": full_logits, "sub": sub_logits, "layers": sub.config.num_hidden_layers,
            "vocab": len(tokenizer)}, sys.argv[4])
"""


def test_export_hf_full_and_exit(straight, tmp_path, capsys):
    from soft_ds.hf_io import load_tensors
    from soft_ds.model import Llama
    from transformers import AutoConfig

    run = straight[0]
    for args in (["--out", tmp_path / "full"], ["--exit", 4, "--out", tmp_path / "exit4"]):
        exported = run_cli(capsys, "export", "--run", run, *args)
        assert exported.returncode == 0, exported.stderr
    result_file = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", LOAD_WITHOUT_SOFT_DS, str(tmp_path / "full"), str(tmp_path / "exit4"),
                    "4", str(result_file)], check=True, timeout=300)
    got = torch.load(result_file)
    assert got["layers"] == 4 and got["vocab"] == 4096
    # Reference: this package's model on the exported full weights, read at exit 4 and at the top.
    config = AutoConfig.from_pretrained(tmp_path / "full")
    model = Llama.from_weights(config, lambda names: load_tensors(tmp_path / "full", names)).eval()
    with torch.no_grad():
        assert (model(got["ids"], exit_layer=4) - got["sub"]).abs().max() <= 1e-5
        assert (model(got["ids"]) - got["full"]).abs().max() <= 1e-5
    # The export records the run's prompt template (the default, alpaca) for generate and eval.
    for name in ("full", "exit4"):
        assert json.loads((tmp_path / name / "config.json").read_text())["soft_ds_template"] == "alpaca"
    # An existing export is never overwritten.
    again = run_cli(capsys, "export", "--run", run, "--out", tmp_path / "full")
    assert again.returncode != 0 and "not empty" in again.stderr


def test_chat_template_run_learns_the_assistant_turn_and_its_export_says_so(tmp_path, capsys):
    """One process, --template chat: the first step's per-exit losses are those of the chat-template
    batch computed here (the loss counts the assistant turn only), and the template travels from
    the checkpoint's metadata to the export, which `soft-ds generate` then prompts in chat."""
    import shutil
    from _eval_checkpoints import add_chat_template
    from soft_ds.data.tokenizer import load_tokenizer
    from soft_ds.model import Llama, preset_config, random_weights
    tokenizer_dir = add_chat_template(shutil.copytree(os.path.join(REPO, "data", "tokenizer"), tmp_path / "tokenizer"))
    records = json.load(open(os.path.join(REPO, "data", "alpaca_5000.json")))[:40]
    data = tmp_path / "alpaca_40.json"
    data.write_text(json.dumps(records))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--ds_config", "ds_configs/tiny_pp2.json", "--model", "debug", "--pipeline_stages", 1, "--tokenizer",
            tokenizer_dir, "--template", "chat", "--data", data, "--seq_len", 96, "--micro_batch_size", 2,
            "--grad_accum", 1, "--train_steps", 1, "--warmup_steps", 0, "--val_size", 0, "--exits", "4,8", "--seed", 7,
            "--output_dir", run]
    result = subprocess.run([sys.executable, "soft_ds/train.py", *map(str, args)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer = load_tokenizer(tokenizer_dir)
    config = preset_config("debug", vocab_size=len(tokenizer))
    model = Llama.from_weights(config, random_weights(config, 7))
    expected = first_step_exit_losses(model, [4, 8], tokenizer, data, 96, 0, 2, 1, 1, 7, template="chat")
    alpaca = first_step_exit_losses(model, [4, 8], tokenizer, data, 96, 0, 2, 1, 1, 7)
    logged = scalars(run)
    for layer in (4, 8):
        assert logged[f"train/exit_{layer}/loss"][1] == pytest.approx(expected[layer], abs=1e-5)
        assert alpaca[layer] != pytest.approx(expected[layer], abs=1e-3)  # the template matters
    meta = json.load(open(os.path.join(run, "checkpoints", "step1", "soft_meta.json")))
    assert meta["soft"]["template"] == "chat"
    assert run_cli(capsys, "export", "--run", run, "--out", tmp_path / "export").returncode == 0
    assert json.loads((tmp_path / "export" / "config.json").read_text())["soft_ds_template"] == "chat"
    generated = run_cli(capsys, "generate", "--model", tmp_path / "export", "--prompt", "Hi", "--max-new-tokens", 2)
    assert generated.returncode == 0, generated.stderr


def test_logged_lr_follows_the_schedule(straight):
    """train/lr at step s is the LR step s ran with: warm-up reaches the peak at step 1 (one
    warm-up step), then cosine decay to min_lr_ratio x lr at the last step."""
    from soft_ds.config import load_config, override
    config = override(load_config(os.path.join(REPO, "ds_configs", "tiny_pp2.json")), train_steps=STEPS,
                      warmup_steps=1)
    lrs = scalars(straight[0])["train/lr"]
    for step in range(1, STEPS + 1):
        assert lrs[step] == pytest.approx(config.lr * config.lr_multiplier(step - 1), rel=1e-6)
    assert lrs[1] == pytest.approx(config.lr, rel=1e-6)


def test_training_starts_from_a_hugging_face_checkpoint(tmp_path):
    """--model DIR: each stage loads its tensors from a sharded safetensors checkpoint; the first
    step's per-exit losses equal a single-process computation on those weights and that batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from soft_ds.data.tokenizer import load_tokenizer
    from soft_ds.hf_io import load_tensors
    from soft_ds.model import Llama

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=4096)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "ckpt", max_shard_size="300KB")
    assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) > 1
    seq_len, micro, accum, seed = 128, 2, 2, 7
    deepspeed_launch(2, "soft_ds/train.py", "--ds_config", "ds_configs/tiny_pp2.json", "--model", tmp_path / "ckpt",
                     "--tokenizer", "data/tokenizer", "--exits", "2,4", "--seq_len", seq_len, "--micro_batch_size",
                     micro, "--grad_accum", accum, "--train_steps", 1, "--warmup_steps", 0, "--val_size", 0,
                     "--seed", seed, "--output_dir", tmp_path / "run")
    logged = scalars(tmp_path / "run")

    model = Llama.from_weights(config, lambda names: load_tensors(tmp_path / "ckpt", names))
    expected = first_step_exit_losses(model, [2, 4], load_tokenizer("data/tokenizer"),
                                      os.path.join(REPO, "data", "alpaca_5000.json"), seq_len, 0, micro, accum, 1, seed)
    for layer in (2, 4):
        assert logged[f"train/exit_{layer}/loss"][1] == pytest.approx(expected[layer], abs=1e-5)


def test_tied_model_trains_resumes_and_exports(tmp_path, capsys):
    """A tied Hugging Face checkpoint (embedding = lm_head, stored once) on 2 stages: each stage
    loads its tensors and the first step's exit losses equal one process's; the checkpoint holds the
    matrix once (in the shared head's file; no embedding layer file); --resume continues bit for bit;
    the export stays tied (no lm_head.weight stored) and transformers reads exit 2's logits."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from soft_ds.data.tokenizer import load_tokenizer
    from soft_ds.hf_io import checkpoint_tensor_names, load_tensors
    from soft_ds.model import Llama

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True)
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "ckpt", max_shard_size="300KB")
    assert "lm_head.weight" not in checkpoint_tensor_names(tmp_path / "ckpt")
    records = json.load(open(os.path.join(REPO, "data", "alpaca_5000.json")))[:100]
    (tmp_path / "data.json").write_text(json.dumps(records))
    seq_len, micro, seed, steps = 64, 2, 5, 2
    args = ["--ds_config", "ds_configs/tiny_pp2.json", "--model", tmp_path / "ckpt", "--tokenizer", "data/tokenizer",
            "--data", tmp_path / "data.json", "--exits", "2,4", "--seq_len", seq_len, "--micro_batch_size", micro,
            "--grad_accum", 1, "--train_steps", steps, "--warmup_steps", 0, "--val_size", 0, "--log_interval", 1,
            "--save_interval", 1, "--seed", seed]
    deepspeed_launch(2, "soft_ds/train.py", *args, "--output_dir", tmp_path / "straight")
    deepspeed_launch(2, "soft_ds/train.py", *args, "--output_dir", tmp_path / "resumed", "--stop_at_step", 1)
    deepspeed_launch(2, "soft_ds/train.py", *args, "--output_dir", tmp_path / "resumed", "--resume")

    a, b = scalars(tmp_path / "straight"), scalars(tmp_path / "resumed")
    model = Llama.from_weights(config, lambda names: load_tensors(tmp_path / "ckpt", names))
    expected = first_step_exit_losses(model, [2, 4], load_tokenizer("data/tokenizer"), tmp_path / "data.json",
                                      seq_len, 0, micro, 1, 1, seed)
    for layer in (2, 4):
        assert a[f"train/exit_{layer}/loss"][1] == pytest.approx(expected[layer], abs=1e-5)
        for step in range(1, steps + 1):
            assert b[f"train/exit_{layer}/loss"][step] == a[f"train/exit_{layer}/loss"][step], (layer, step)
    final = os.path.join("checkpoints", f"step{steps}")
    names = sorted(os.listdir(tmp_path / "straight" / final))
    assert "layer_00-model_states.pt" not in names  # the embedding is the shared head's
    holders = []
    for name in names:
        if name.startswith(("layer_", "shared_head")):
            x = torch.load(tmp_path / "straight" / final / name, weights_only=True)
            y = torch.load(tmp_path / "resumed" / final / name, weights_only=True)
            assert all(torch.equal(x[k], y[k]) for k in x), name
            holders += [name] * any(k.endswith(("embed_tokens.weight", "lm_head.weight")) for k in x)
    assert holders == ["shared_head-model_states.pt"]

    exported = run_cli(capsys, "export", "--run", tmp_path / "straight", "--exit", 2, "--out", tmp_path / "exit2")
    assert exported.returncode == 0, exported.stderr
    assert json.loads((tmp_path / "exit2" / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in checkpoint_tensor_names(tmp_path / "exit2")
    trained = run_cli(capsys, "export", "--run", tmp_path / "straight", "--out", tmp_path / "full")
    assert trained.returncode == 0, trained.stderr
    full = Llama.from_weights(config, lambda names: load_tensors(tmp_path / "full", names)).eval()
    sub = AutoModelForCausalLM.from_pretrained(tmp_path / "exit2").eval()
    ids = torch.randint(3, 4096, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (full(ids, exit_layer=2) - sub(ids).logits).abs().max() <= 1e-5
        assert not torch.equal(full.model.embed_tokens.weight, model.model.embed_tokens.weight)  # it trained


def test_packed_run_logs_the_first_step_one_process_computes_on_packed_rows(tmp_path):
    """--packing end to end (one process, no launcher): the step-1 exit losses are those of the
    packed global batch, and they differ from the padded run's (the rows really were packed)."""
    from conftest import check_debug_run_first_step
    args = ["--ds_config", "ds_configs/tiny_pp2.json", "--pipeline_stages", 1, "--model", "debug", "--exits",
            "2,4,6,8", "--seq_len", 512, "--micro_batch_size", 2, "--grad_accum", 2, "--train_steps", 1,
            "--warmup_steps", 0, "--val_size", 0, "--log_interval", 1, "--seed", 5]
    for packing in ("--packing", "--no-packing"):
        result = subprocess.run([sys.executable, "soft_ds/train.py", *map(str, args), packing, "--output_dir",
                                 str(tmp_path / packing)], cwd=REPO, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        log = result.stdout + result.stderr
        rows = "packed rows of 512 tokens" if packing == "--packing" else "padded rows of 512 tokens: 5000 train records in 5000 rows"
        assert rows in log and ("packed attention: sdpa-mask" in log) == (packing == "--packing")
    check_debug_run_first_step(tmp_path / "--packing", [2, 4, 6, 8], 5, 512, 2, 2, 1, packing=True)
    check_debug_run_first_step(tmp_path / "--no-packing", [2, 4, 6, 8], 5, 512, 2, 2, 1, packing=False)
    packed, padded = (scalars(tmp_path / flag)["train/loss"][1] for flag in ("--packing", "--no-packing"))
    assert abs(packed - padded) > 1e-4  # 10x the tolerance above: the two checks tell them apart


def test_random_k_run_resumes_identically_and_logs_the_exits_it_ran(tmp_path):
    """--exit_schedule random-k on 2 stages: each step logs the exits it drew (the last layer and one
    other), their shares, and a loss equal to their weighted mean; a run stopped at step 2 and
    resumed draws the same exits and ends with bit-identical weights (the draw is a function of the
    seed and the step: nothing to save)."""
    records = json.load(open(os.path.join(REPO, "data", "alpaca_5000.json")))[:200]
    (tmp_path / "data.json").write_text(json.dumps(records))
    args = ["--ds_config", "ds_configs/tiny_pp2.json", "--model", "debug", "--data", tmp_path / "data.json",
            "--seq_len", 64, "--micro_batch_size", 2, "--grad_accum", 2, "--train_steps", STEPS, "--warmup_steps", 1,
            "--val_size", 0, "--log_interval", 1, "--save_interval", 2, "--exit_schedule", "random-k",
            "--exit_sample_k", 2, "--exit_weights", "1,1,1,2"]
    straight = deepspeed_launch(2, "soft_ds/train.py", *args, "--output_dir", tmp_path / "straight")
    assert "exits [2, 4, 6, 8] (random-k, k=2)" in straight.stdout
    deepspeed_launch(2, "soft_ds/train.py", *args, "--output_dir", tmp_path / "resumed", "--stop_at_step", 2)
    resumed = deepspeed_launch(2, "soft_ds/train.py", *args, "--output_dir", tmp_path / "resumed", "--resume")
    assert "resumed from step 2" in resumed.stdout

    a, b = scalars(tmp_path / "straight"), scalars(tmp_path / "resumed")
    drawn = []
    for step in range(1, STEPS + 1):
        ran = [n for n in EXITS if step in a.get(f"train/exit_{n}/loss", {})]
        shares = {n: a[f"train/exit_{n}/share"][step] for n in EXITS}
        assert len(ran) == 2 and ran[-1] == 8, (step, ran)
        assert [n for n in EXITS if shares[n] > 0] == ran
        assert shares[ran[0]] == pytest.approx(1 / 3) and shares[8] == pytest.approx(2 / 3)
        assert a["train/loss"][step] == pytest.approx(sum(shares[n] * a[f"train/exit_{n}/loss"][step] for n in ran),
                                                      rel=1e-6)
        assert f"| shares {ran[0]}:0.33 8:0.67 |" in straight.stdout.split(f"step {step}/{STEPS} |")[1].split("\n")[0]
        drawn.append(ran[0])
        for tag in ["train/loss"] + [f"train/exit_{n}/loss" for n in ran] + [f"train/exit_{n}/share" for n in EXITS]:
            assert b[tag][step] == a[tag][step], (tag, step)
    assert len(set(drawn)) > 1  # the draw changes from step to step
    final = os.path.join("checkpoints", f"step{STEPS}")
    for name in sorted(os.listdir(tmp_path / "straight" / final)):
        if name.startswith(("layer_", "shared_head")):
            x = torch.load(tmp_path / "straight" / final / name, weights_only=True)
            y = torch.load(tmp_path / "resumed" / final / name, weights_only=True)
            assert all(torch.equal(x[k], y[k]) for k in x), name
