"""Smoke test of `soft-ds bench overhead`: a very small run prints both ratios, the analytic
FLOP share and a verdict per goal. (Its figures are not checked: speed is judged by running the
benchmark, never by a timed test.)"""

import re
import subprocess

from conftest import REPO, soft_ds_command


def test_benchmark_prints_ratios_and_verdicts():
    result = subprocess.run(
        [soft_ds_command(), "bench", "overhead", "--layers", "10", "--hidden", "64", "--intermediate", "172",
         "--seq-len", "32", "--grad-accum", "2", "--warmup", "1", "--repeats", "2", "--steps", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"LLaMA 2 13B 8\.8\d%", out)  # the analytic share for the real 13B
    # Every exit-loss candidate: SFT s, SoFT s, SoFT/SFT; its goal verdicts; one exit's time and kept bytes.
    for candidate in (r"whole", r"chunked \(\d+\)", r"fused-kept \(\d+\)", r"fused-direct \(\d+\)"):
        assert re.search(candidate + r"\s+[\d.]+\s+[\d.]+\s+\d\.\d{3} \[", out), candidate
        assert re.search(candidate + r"\s+[+-][\d.]+% (PASS|MISS)\s+\d\.\d{3}x (PASS|MISS)", out), candidate
        assert re.search(candidate + r"\s+\d+\.\d\d\s+\d+\.\d\d\s+\d+\n", out), candidate
