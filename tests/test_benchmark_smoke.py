"""Smoke test of `soft-ds bench overhead`: a very small run prints both ratios, the analytic
FLOP share and a verdict per goal. (Its figures are not checked: speed is judged by running the
benchmark, never by a timed test.)"""

import os
import re
import subprocess

import pytest

from conftest import REPO, soft_ds_command


def test_benchmark_prints_ratios_and_verdicts():
    result = subprocess.run(
        [soft_ds_command(), "bench", "overhead", "--ds-config", "ds_configs/tiny_pp2.json", "--layers", "10",
         "--hidden", "64", "--intermediate", "172", "--seq-len", "128", "--grad-accum", "2", "--micro_batch_size", "1",
         "--warmup", "1", "--repeats", "2", "--steps", "1", "--compare-exit-losses"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "2 stages, fp32, ZeRO-1, AdamW; micro-batch 1 rows x 128 tokens, grad-accum 2: 256 positions" in out
    assert re.search(r"LLaMA 2 13B, every token through the heads: 8\.8\d%", out)  # the analytic share for the 13B
    for layout in ("packed", "padded"):
        assert re.search(layout + r" rows .*: \d+ real tokens per step \(\d+% of the positions\), \d+ counted", out)
    # Every SoFT engine: SFT s, SoFT s, SoFT/SFT [range], fastest, CPU, expected; and its memory row.
    for engine in ("fused-direct/packed", "fused-direct/packed/random-2", "fused-direct/padded", "whole/packed",
                   "chunked/packed", "fused-kept/packed"):
        row = re.escape("soft/" + engine)
        assert re.search(row + r"\s+[\d.]+\s+[\d.]+\s+\d\.\d{3} \[[\d.]+-[\d.]+\]\s+[\d.]+\s+[\d.]+\s+\d\.\d{3}\n",
                         out), engine
        assert re.search(row + r"\s+[\d.]+ / [\d.]+\s+[\d.]+ / [\d.]+\s+\d\.\d{3}\s+\d\.\d{3}\n", out), engine
    for candidate in (r"whole", r"chunked \(\d+\)", r"fused-kept \(\d+\)", r"fused-direct \(\d+\)"):
        assert re.search(candidate + r"\s+\d+\.\d\d\s+\d+\.\d\d\s+\d+\n", out), candidate
    for mode in ("sft", "soft"):
        assert re.search(mode + r"\s+[\d,]+\s+[\d,]+\s+\d+\.\d\d\s+\d+\.\d\d\n", out), mode
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"GOALS: time \d\.\d{3} (PASS|MISS) \| random-k \d\.\d{3} (PASS|MISS) \| "
                        r"memory \d\.\d{3} (PASS|MISS) \| packing \d+\.\d\d (PASS|MISS)", last), last


def test_bench_config_is_the_files_with_the_bench_settings_then_the_flags():
    """The launch's DeepSpeed config is RunConfig.deepspeed_config of the --ds-config file (default
    tiny_pp2.json: 2 stages, fp32, ZeRO-1, with the bench's pinned settings), then the flags, plus
    ZeRO buckets scaled to the proxy."""
    from soft_ds.bench.overhead import (BENCH_SETTINGS, DEFAULT_CONFIG, args_proxy, deepspeed_config, parse_args,
                                        zero_bucket_elements)
    from soft_ds.config import load_config, override
    from soft_ds.settings import ConfigError

    args, config = parse_args([])
    assert (config.soft.pipeline_stages, config.grad_accum, config.soft.seq_len) == (2, 4, 512)  # the file's
    assert (config.micro_batch_size, config.soft.exit_chunk_tokens) == (2, 1024)  # pinned over the file's 1 and 512
    ds = deepspeed_config(config, args_proxy(args, config))
    buckets = zero_bucket_elements(args_proxy(args, config))
    assert ds.pop("zero_optimization") == {"stage": 1, "reduce_bucket_size": buckets, "allgather_bucket_size": buckets}
    expected = override(load_config(DEFAULT_CONFIG), **BENCH_SETTINGS).deepspeed_config(2, cpu=True)
    assert expected.pop("zero_optimization") == {"stage": 1} and ds == expected
    assert ds["train_batch_size"] == 8 and ds["gradient_clipping"] == 0.0 and "bf16" not in ds

    args, config = parse_args(["--micro-batch-size", "3", "--grad_accum", "2", "--seq-len", "128",
                               "--exit-chunk-tokens", "64", "--pipeline-stages", "4"])
    assert (config.micro_batch_size, config.grad_accum, config.soft.seq_len) == (3, 2, 128)
    assert (config.soft.exit_chunk_tokens, config.soft.pipeline_stages) == (64, 4)
    args, config = parse_args(["--ds-config", DEFAULT_CONFIG])  # a file given is measured as it says
    assert (config.micro_batch_size, config.soft.exit_chunk_tokens) == (1, 512)
    with pytest.raises(ConfigError, match="fp32"):
        parse_args(["--ds-config", os.path.join(REPO, "ds_configs", "pp4.json")])  # bf16


def test_alpaca_shaped_rows_keep_each_records_length_and_counted_tokens():
    """The benchmarks' rows: the bundled sample's records (lengths and counted positions as training
    tokenizes them), padded one per row or packed by the training code's packer."""
    from soft_ds.bench.rows import alpaca_shapes, counted_tokens, real_tokens, shaped_batches
    from soft_ds.data.packing import epoch_rows

    shapes = alpaca_shapes(512)
    assert len(shapes) == 5000 and max(map(len, shapes)) == 512
    assert sum(len(mask) == 512 for mask in shapes) == 17  # the records training truncates at 512
    padded = shaped_batches(shapes, 512, 1000, micro_batch=2, count=3, packed=False, seed=4)
    packed = shaped_batches(shapes, 512, 1000, micro_batch=2, count=3, packed=True, seed=4)
    order = [row[0] for row in epoch_rows(5000, 4, 0)][:6]
    assert real_tokens(padded) == sum(len(shapes[i]) for i in order)
    assert counted_tokens(padded) == sum(sum(shapes[i]) for i in order)
    rows = epoch_rows(5000, 4, 0, tuple(map(len, shapes)), 512)[:6]
    assert real_tokens(packed) == sum(len(shapes[i]) for row in rows for i in row)
    assert counted_tokens(packed) == sum(sum(shapes[i]) for row in rows for i in row)
    assert real_tokens(packed) > 3 * real_tokens(padded)
    ids, targets, positions = packed[0]
    assert ids.shape == targets.shape == positions.shape == (2, 512) and (positions[:, 1:] == 0).any()
