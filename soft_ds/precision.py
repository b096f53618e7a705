"""Which arithmetic a run's matmuls use, chosen from what the machine does fast.

`soft.autocast` (bf16 matmuls on fp32 weights, entered by each pipeline layer: `pipe.precision`)
is "auto" by default, and `resolve_autocast` decides it once per process, before any distributed
work:

* CUDA: on where the GPU computes bf16 natively (`torch.cuda.is_bf16_supported`: Ampere and
  newer), unless DeepSpeed's `bf16` already makes the weights bf16.
* CPU: measured. A bf16 matmul is fast only on CPUs with bf16 instructions (AVX-512 BF16, AMX);
  elsewhere oneDNN emulates it: on a 2-core AVX2-only AMD EPYC a SmolLM2-shaped bf16 matmul ran
  8.95x slower than fp32, and the demo did not finish its first 5 steps in 9 minutes. So two
  small matmuls are timed in both precisions (about 0.1 s) and autocast is on only where bf16 is
  clearly faster.

`--autocast` / `--no-autocast` (or true / false in the config) force it; the start line says
which was chosen and why.
"""

import os
import time

import torch

from soft_ds.settings import AUTO

# bf16 must take at most this share of fp32's time: a margin against timing noise.
CPU_SPEEDUP_THRESHOLD = 0.8
# The CPU features that make bf16 matmuls native (Linux /proc/cpuinfo names), named in the reason.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags() -> list[str]:
    """The bf16 instruction sets this CPU reports (Linux; empty elsewhere or when it has none)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [flag for flag in BF16_CPU_FLAGS if flag in flags]


def _best_time(fn, repeats: int = 5) -> float:
    fn()  # warm-up: oneDNN builds its kernel on first use
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_cpu_bf16_ratio() -> float:
    """bf16-autocast time / fp32 time of a (256 x 576) @ (576 x 1536) matmul (SmolLM2's MLP shape),
    best of 5 each, with this process's thread count: < 1 where bf16 is faster."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 576, generator=generator)
    w = torch.randn(1536, 576, generator=generator)

    def fp32():
        torch.nn.functional.linear(x, w)

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.functional.linear(x, w)

    return _best_time(bf16) / _best_time(fp32)


def resolve_autocast(setting, device_type: str, bf16_weights: bool, measure=measure_cpu_bf16_ratio) -> tuple[bool, str]:
    """(autocast on?, why) for soft.autocast's `setting` (True, False or "auto") on `device_type`."""
    if setting != AUTO:
        return bool(setting), f"autocast {'on' if setting else 'off'} (set)"
    if bf16_weights:
        return False, "autocast auto: off (bf16 weights: the matmuls are bf16 already)"
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"autocast auto: on ({torch.cuda.get_device_name()} computes bf16 natively)"
        return False, f"autocast auto: off ({torch.cuda.get_device_name()} has no native bf16)"
    if device_type != "cpu":
        return False, f"autocast auto: off (no rule for {device_type}; --autocast forces it)"
    ratio = measure()
    flags = cpu_bf16_flags()
    features = f"bf16 instructions: {', '.join(flags)}" if flags else "no bf16 instructions reported"
    caps = [f"{name}={os.environ[name]}" for name in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")
            if name in os.environ]
    features += f"; {', '.join(caps)}" if caps else ""
    speed = f"a bf16 matmul took {ratio:.2f}x fp32's time on this CPU ({features})"
    if ratio <= CPU_SPEEDUP_THRESHOLD:
        return True, f"autocast auto: on ({speed})"
    return False, f"autocast auto: off ({speed}; --autocast forces it)"
