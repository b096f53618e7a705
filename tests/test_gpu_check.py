"""`soft-ds bench gpu-check` (tools/gpu_check.sh): its CPU mode end to end, as the test suite can run
it (about 15 s), checked on its report and its JSON; the verdict rules on made-up runs; a bad
--model is one error line before any work. The GPU numbers themselves need a GPU run."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, run_cli
from soft_ds.bench.gpu_check import (EXPECTED_OPTIMIZER, TOLERANCES, TrainingRun, kernel_availability,
                                     kernels_to_check, peak_tflops, relative_difference, run_figures)


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    """One CPU-mode run through the shell entry point: (completed process, its --out JSON)."""
    work = tmp_path_factory.mktemp("gpu-check")
    out = work / "figures.json"
    result = subprocess.run(["bash", "tools/gpu_check.sh", "--cpu", "--work", str(work), "--out", str(out)],
                            cwd=REPO, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                            timeout=600)
    assert out.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads(out.read_text())


def test_cpu_mode_trains_bf16_against_fp32_and_reports_one_verdict(cpu_check):
    result, figures = cpu_check
    assert figures["cpu_mode"] and figures["steps"] == 2
    assert figures["tolerances"] == TOLERANCES
    # On CPU only sdpa-mask trains (flex has no CPU backward, flash-attn needs CUDA).
    assert [row["kernel"] for row in figures["kernels"]] == ["sdpa-mask"]
    assert figures["skipped_kernels"] == {"flash-varlen": "needs CUDA", "flex": "needs CUDA"}
    reference = figures["reference"]
    assert (reference["kernel"], reference["precision"], reference["error"]) == ("sdpa-mask", "fp32", None)
    for row in [reference] + figures["kernels"]:
        assert len(row["losses"]) == len(row["exit_losses"]) == len(row["grad_norms"]) == 2
        assert all(math.isfinite(loss) for loss in row["losses"])
        assert [sorted(map(int, step)) for step in row["exit_losses"]] == [[2, 4, 6, 8]] * 2  # the debug preset's
        assert row["tokens_per_s"] > 0 and row["model_tflops_per_s"] > 0 and row["mfu"] is None  # CPU: no peak
        assert all(real > counted > 0 for real, counted in zip(row["real_tokens"], row["counted_tokens"]))
    row = figures["kernels"][0]
    assert row["precision"] == "bf16" and row["exit_loss"] == "chunked" and row["error"] is None
    # Every compared figure is finite and within its tolerance (the bf16 and fp32 runs really differ:
    # a difference of exactly 0 would mean the two runs were one).
    assert set(row["differences"]) == {"first_step", "grad_norm", "later_steps"}
    for kind, worst in row["differences"].items():
        assert 0 < worst["value"] <= worst["tolerance"] == TOLERANCES[kind], (kind, worst)
    # The verdict follows from the optimizer class DeepSpeed built, and the report says so.
    out = result.stdout
    last = out.rstrip().splitlines()[-1]
    if row["optimizer"] == EXPECTED_OPTIMIZER:
        assert (result.returncode, figures["verdict"], figures["reasons"]) == (0, "PASS", []), out[-3000:]
        assert last == "gpu-check: PASS"
    else:
        assert (result.returncode, figures["verdict"]) == (1, "FAIL")
        assert re.fullmatch(r"gpu-check: FAIL \(.*sdpa-mask: DeepSpeed built \w+, not BF16_Optimizer.*\)", last), last
    assert re.search(r"sdpa-mask\s+bf16\s+" + row["optimizer"] + r"\s+chunked\s+[\d.]+%\s+[\d.]+%\s+[\d.]+%\s+[\d,]+",
                     out)
    assert "MFU: n/a (peak unknown; --peak-tflops to set)" in out
    assert "CPU mode: checks the plumbing, not GPU numbers" in out
    assert "gpu-check: bf16 sdpa-mask: step 2/2" in result.stderr  # progress on stderr, the report on stdout
    assert "gpu-check:" not in out.replace(last, "")


def test_cpu_mode_includes_the_inference_rows(cpu_check):
    result, figures = cpu_check
    inference = figures["inference"]
    assert inference["error"] is None and "--no-proxy" in inference["command"]
    assert set(inference["goals"]) == {"model"}  # the model's goal lines, no proxy
    # The benchmark's exit table on the same model, quoted in the report.
    assert re.search(r"\|\s+8 \(full\)\s+[\d.]+\s+1\.00", result.stdout)
    assert re.search(r"\|\s+2\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+(PASS|MISS)", result.stdout)


def made_up_run(precision="bf16", optimizer=EXPECTED_OPTIMIZER, losses=(8.0, 7.0), first_exit=4.0, norm=2.0):
    return TrainingRun("sdpa-mask", precision, optimizer=optimizer, exit_loss="chunked", losses=list(losses),
                       exit_losses=[{2: first_exit, 4: 3.0}, {2: 3.5, 4: 2.5}], grad_norms=[norm, 1.0],
                       step_seconds=[1.0, 0.5], real_tokens=[100, 200], counted_tokens=[50, 80],
                       model_flops=[1e9, 2e9])


def test_verdict_rules_fail_a_wrong_optimizer_and_each_tolerance():
    reference = made_up_run("fp32", "DeepSpeedZeroOptimizer")
    passing = run_figures(made_up_run(losses=(8.04, 7.5)), reference, peak=1.0)
    assert passing["problems"] == [] and passing["tokens_per_s"] == 400 and passing["mfu"] == pytest.approx(4e-3)
    assert passing["differences"]["later_steps"]["where"] == "step 2 loss"
    assert run_figures(made_up_run(optimizer="DeepSpeedZeroOptimizer"), reference, None)["problems"][0].startswith(
        "DeepSpeed built DeepSpeedZeroOptimizer, not BF16_Optimizer")
    problems = {
        "first step": made_up_run(first_exit=4.1),  # exit 2 off by 2.5 % at step 1
        "gradient norm": made_up_run(norm=2.1),  # 5 %
        "later steps": made_up_run(losses=(8.0, 9.0)),  # 29 %
        "not finite": made_up_run(losses=(8.0, math.nan)),
    }
    for name, run in problems.items():
        assert len(run_figures(run, reference, None)["problems"]) == 1, name
    assert run_figures(TrainingRun("flex", "bf16", error="RuntimeError: boom"), reference, None)["problems"] == [
        "failed (RuntimeError: boom)"]
    assert relative_difference(None, 1.0) == math.inf and relative_difference(1.0, 0.0) == math.inf


def test_kernels_checked_are_those_the_device_runs(monkeypatch):
    from soft_ds import model
    reasons = []
    assert kernels_to_check(None, True, reasons) == (["sdpa-mask"], {"flash-varlen": "needs CUDA",
                                                                      "flex": "needs CUDA"})
    assert reasons == []
    # Asked for by name, a kernel the device lacks fails the check instead of being skipped.
    assert kernels_to_check("flex,sdpa-mask", True, reasons)[0] == ["sdpa-mask"]
    assert reasons == ["flex asked for but needs CUDA"]
    assert kernel_availability("cuda") == {"flash-varlen": model.flash_attn_problem(), "flex": None,
                                           "sdpa-mask": None}
    # On a GPU a flash_attn that is installed but broken is a failure, not a skip: training falls back.
    broken = "flash_attn is installed but does not import (undefined symbol: _ZN3c10)"
    monkeypatch.setattr(model, "flash_attn_problem", lambda: broken)
    reasons = []
    assert kernels_to_check(None, False, reasons) == (["flex", "sdpa-mask"], {"flash-varlen": broken})
    assert reasons == [broken]


def test_peak_flops_by_card_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert peak_tflops("NVIDIA H100 PCIe") == 756
    assert peak_tflops("NVIDIA H200") == 989
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert peak_tflops("NVIDIA GeForce RTX 3090") is None


def test_bad_model_path_is_one_error_line_before_any_work(capsys, tmp_path):
    work = tmp_path / "work"
    result = run_cli(capsys, "bench", "gpu-check", "--model", tmp_path / "no-such-model", "--work", work)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"error: checkpoint path {tmp_path / 'no-such-model'} does not exist; "
                                          "expected a Hugging Face checkpoint directory (config.json + weights)"]
    assert not work.exists()  # nothing imported, written or trained
