"""soft.autocast "auto": decided from the machine (soft_ds/precision.py), forced by true/false."""

import pytest

from soft_ds.precision import CPU_SPEEDUP_THRESHOLD, measure_cpu_bf16_ratio, resolve_autocast


@pytest.mark.parametrize("ratio, on", [(0.3, True), (CPU_SPEEDUP_THRESHOLD, True), (1.0, False), (8.95, False)],
                         ids=["bf16-cpu", "threshold", "even", "avx2-only"])
def test_cpu_auto_follows_the_measured_bf16_speed(ratio, on):
    """On where a bf16 matmul takes at most 0.8 of fp32's time; off on CPUs that emulate bf16 (an
    AVX2-only EPYC: 8.95x slower). The reason names the measurement."""
    chosen, why = resolve_autocast("auto", "cpu", bf16_weights=False, measure=lambda: ratio)
    assert chosen is on and why.startswith(f"autocast auto: {'on' if on else 'off'}")
    assert f"{ratio:.2f}x fp32's time" in why


def test_forced_and_bf16_weights_skip_the_measurement():
    def never():
        raise AssertionError("measured although the answer was given")
    assert resolve_autocast(True, "cpu", False, measure=never) == (True, "autocast on (set)")
    assert resolve_autocast(False, "cuda", False, measure=never) == (False, "autocast off (set)")
    chosen, why = resolve_autocast("auto", "cpu", bf16_weights=True, measure=never)
    assert not chosen and "bf16 weights" in why


def test_the_measurement_is_a_positive_ratio():
    assert 0 < measure_cpu_bf16_ratio() < 100
