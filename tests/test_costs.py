"""soft_ds.costs and `soft-ds plan`: numbers by hand on the debug model, parameter counts against a
real DeepSpeed pipeline, the 13B paper layout, and the CLI's errors."""

import json
import subprocess

import pytest

from soft_ds.model import preset_config
from soft_ds.costs import GIB, bubble_fraction, flops_balance, load_model_config, stage_costs
from conftest import REPO, deepspeed_launch, run_cli, soft_ds_command

# debug: H=64, I=128, 8 layers, 4 heads of 16, 2 kv heads (KV = 32), V=512; exits 2,4,6,8.
LAYER = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64  # q,k,v,o + mlp + 2 norms = 36992
EMBED = 512 * 64
HEAD = 64 + 512 * 64  # final norm + lm_head
TOKENS = 2 * 16  # micro-batch 2 x seq 16
FULL_LAYER = TOKENS * 2 * (8 * 64 + 2 * 32 + 4 * 128)  # bf16 (8H + 2KV + 4I) = 69632
LAYER_FLOPS = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 4 * 16 * 16 / 2)  # per token
HEAD_FLOPS = 2 * 64 * 512


def debug_plan(tied=False, **overrides):
    kwargs = dict(pipeline_stages=2, data_parallel=2, micro_batch=2, seq_len=16, grad_accum=4, bf16=True,
                  zero_stage=1, activation_checkpointing=False, exit_loss="whole", exit_chunk_tokens=0,
                  gpu_gib=1.0)
    return stage_costs(preset_config("debug", tie_word_embeddings=tied), **{**kwargs, **overrides})


def test_debug_by_hand_no_checkpointing_unchunked():
    s0, s1 = debug_plan()
    assert (s0.first_layer, s0.last_layer, s0.exits) == (1, 4, (2, 4))
    assert (s1.first_layer, s1.last_layer, s1.exits) == (5, 8, (6, 8))
    assert s0.parameters == EMBED + 4 * LAYER + HEAD == 213568
    assert s1.parameters == 4 * LAYER + HEAD == 180800
    # bf16, ZeRO-1 over dp 2: 2 + 2 + 12 / 2 bytes per parameter.
    assert s0.static_bytes == 213568 * 10
    exits_kept = 2 * TOKENS * (2 * 64 + (2 + 4) * 512)  # two exits: norm output, logits, fp32 log-probs
    assert s0.activation_bytes == s0.activation_bytes_full == 4 * FULL_LAYER + exits_kept
    assert s0.activation_bytes_checkpointed == 4 * TOKENS * 64 * 2 + exits_kept
    assert s0.transient_bytes == 0
    assert (s0.in_flight, s1.in_flight) == (2, 1)
    assert s0.memory_bytes == s0.static_bytes + 2 * s0.activation_bytes
    assert s0.flops == pytest.approx(3 * TOKENS * (4 * LAYER_FLOPS + 2 * HEAD_FLOPS))
    assert s0.flops == pytest.approx(41680896)
    assert flops_balance([s0, s1]) == 1.0
    assert s0.fits and s0.gpu_bytes == GIB


def test_debug_by_hand_checkpointing_chunked_fp32():
    s0, s1 = debug_plan(activation_checkpointing=True, exit_loss="chunked", exit_chunk_tokens=8, bf16=False,
                        zero_stage=0,
                        grad_accum=1)
    assert s1.static_bytes == 180800 * 16  # fp32: 4 + 4 + 8, nothing sharded
    full_layer_fp32 = 2 * FULL_LAYER
    assert s0.activation_bytes == 4 * TOKENS * 64 * 4  # layer inputs only; chunked logits are transient
    assert s0.activation_bytes_full == 4 * full_layer_fp32
    assert s0.transient_bytes == full_layer_fp32 + 8 * 512 * 4 * 2  # one layer recomputed + one chunk
    assert (s0.in_flight, s1.in_flight) == (1, 1)  # grad_accum 1 caps the 1F1B window
    # forward + backward + decoder recompute + head recompute (chunked exit loss).
    assert s0.flops == pytest.approx(TOKENS * (4 * 4 * LAYER_FLOPS + 4 * 2 * HEAD_FLOPS))


@pytest.mark.parametrize("bf16", [True, False])
def test_debug_by_hand_fused_on_counted_tokens(bf16):
    """The fused exit loss on a quarter of the tokens counted: each exit keeps its input gradient
    (and under bf16 the V x H weight gradient; fp32 adds it to the gradient in the forward pass),
    one chunk's logits and the fp32 weight-gradient sum are transient; heads' FLOPs on 8 tokens,
    nothing recomputed."""
    s0, _ = debug_plan(exit_loss="fused", exit_chunk_tokens=5, counted_share=0.25, bf16=bf16)
    a = 2 if bf16 else 4
    counted = TOKENS // 4
    exit_kept = counted * 64 * a + (512 * 64 * a if bf16 else 0)
    assert s0.activation_bytes_full == 4 * FULL_LAYER * a // 2 + 2 * exit_kept
    assert s0.transient_bytes == 5 * 512 * (4 + a) + (512 * 64 * 4 if bf16 else 0)
    assert s0.flops == pytest.approx(3 * (TOKENS * 4 * LAYER_FLOPS + counted * 2 * HEAD_FLOPS))
    whole = debug_plan(counted_share=0.25, bf16=bf16)[0]
    assert whole.activation_bytes_full == 4 * FULL_LAYER * a // 2 + 2 * counted * (a * 64 + (a + 4) * 512)
    assert whole.flops == s0.flops


def test_sft_stage_without_exit_holds_no_head():
    s0, s1 = debug_plan(mode="sft")
    assert s0.exits == () and s1.exits == (8,)
    assert s0.parameters == EMBED + (s0.last_layer) * LAYER
    assert s1.parameters == (8 - s1.first_layer + 1) * LAYER + HEAD


@pytest.mark.parametrize("mode", ["soft", "sft"])
def test_tied_embedding_counts_on_every_stage_that_holds_it(mode):
    """Tied: the one embedding/lm_head matrix and the final norm sit on stage 0 (which embeds) and
    on the exit stage(s), whether or not stage 0 has an exit."""
    s0, s1 = debug_plan(tied=True, mode=mode)
    untied = debug_plan(mode=mode)
    assert [p.exits for p in untied] == [p.exits for p in (s0, s1)]
    assert s0.parameters == EMBED + 64 + 4 * LAYER
    assert s1.parameters == EMBED + 64 + 4 * LAYER
    assert s0.flops == untied[0].flops and s1.flops == untied[1].flops


def test_bubble_and_zero_shards():
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction(1, 8) == 0
    zero0, zero1 = debug_plan(zero_stage=0)[1], debug_plan(zero_stage=1, data_parallel=4)[1]
    assert zero0.static_bytes == 180800 * 16 and zero1.static_bytes == 180800 * 7


def test_13b_pp4_paper_layout():
    plans = stage_costs(load_model_config("13B"), pipeline_stages=4, data_parallel=8, micro_batch=4, seq_len=512,
                 grad_accum=4, zero_stage=1, activation_checkpointing=True)
    assert [(p.first_layer, p.last_layer) for p in plans] == [(1, 12), (13, 20), (21, 28), (29, 40)]
    assert [p.exits for p in plans] == [(12,), (16, 20), (24, 28), (32, 36, 40)]
    # All 13B parameters once, plus the shared head again on the three later stages.
    head = 5120 + 32000 * 5120
    assert sum(p.parameters for p in plans) == 13_015_864_320 + 3 * head


def test_parameters_match_real_pipeline(tmp_path):
    deepspeed_launch(2, "tests/_costs_worker.py", "--out", tmp_path, timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for mode in ("soft", "sft", "soft_tied", "sft_tied"):
        planned = debug_plan(mode=mode.removesuffix("_tied"), tied=mode.endswith("_tied"))
        built = {r[mode]["stage"]: r[mode]["parameters"] for r in ranks}
        assert built == {p.stage: p.parameters for p in planned}, mode


def run_plan(capsys, *args):
    return run_cli(capsys, "plan", "--ds-config", "ds_configs/tiny_pp2.json", *args)


def test_cli_table_and_verdict(capsys):
    out = run_plan(capsys, "--model", "debug", "--pipeline-stages", "2", "--world-size", "4", "--micro-batch-size", "2",
                   "--seq_len", "16", "--grad-accum", "4", "--bf16", "--zero-stage", "1", "--exit-loss", "whole",
                   "--exit-chunk-tokens", "0", "--gpu-gib", "1")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[2].split()[:4] == ["0", "1-4", "2,4", "213,568"]
    assert lines[3].split()[:4] == ["1", "5-8", "6,8", "180,800"]
    assert "1F1B bubble: 20.0%" in out.stdout
    assert lines[-1].startswith("slowest stage: 0") and "every stage fits in 1 GiB" in lines[-1]
    tight = run_plan(capsys, "--model", "debug", "--pipeline-stages", "2", "--gpu-gib", "0.001")
    assert "do NOT fit" in tight.stdout


def test_cli_help():
    out = subprocess.run([soft_ds_command(), "plan", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "--activation-checkpointing" in out.stdout and "--gpu-gib" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/config.json"], "neither a named size"),
    (["--model", "debug", "--exits", "2,9"], "exit(s) [9] out of range for the model: it has 8 layers"),
    (["--model", "debug", "--pipeline-stages", "5"], "cannot be aligned to exits"),
    (["--model", "debug", "--exits", "2,x"], "comma-separated"),
    (["--model", "debug", "--world-size", "3"], "world size 3 is not divisible by pipeline_stages=2"),
    (["--model", "debug", "--bf16", "--zero-stage", "0"], "bf16 needs zero_optimization.stage 1"),
    (["--model", "debug", "--mode", "ict"], "plan estimates soft and sft runs"),
])
def test_cli_errors(capsys, args, message):
    out = run_plan(capsys, *args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_config_json_path(tmp_path):
    config = preset_config("debug").to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_model_config(str(tmp_path / "config.json"))
    assert loaded.num_hidden_layers == 8 and loaded.num_key_value_heads == 2
    assert load_model_config(str(tmp_path)).hidden_size == 64  # a directory holding config.json
    (tmp_path / "bad.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="has model_type='gpt2'; only LLaMA"):
        load_model_config(str(tmp_path / "bad.json"))
