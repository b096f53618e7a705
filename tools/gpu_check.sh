#!/usr/bin/env bash
# GPU acceptance check (soft_ds/bench/gpu_check.py): on one GPU, a few bf16 SoFT training steps
# per packed-attention kernel (flash-varlen, flex, sdpa-mask) compared with an fp32 reference, the
# optimizer class DeepSpeed built, tokens/s and MFU, then inference rows; the last line is
# `gpu-check: PASS` or `gpu-check: FAIL (reasons)` (exit code 0 or 1). Default model:
# SmolLM2-135M-Instruct, imported once into runs/gpu-check. Sized for a few minutes on one H100 (at
# most 8; not yet timed on one). Without CUDA (or with --cpu) it runs the same flow on a tiny random
# model in about 20 s on 2 cores: that checks the plumbing, not GPU numbers. On a cluster, run
# tools/setup.sh first (once, after installing your cluster's torch build). Options go to the
# check: --model DIR, --out FILE.json, --steps N, --kernels ..., --peak-tflops X, --no-inference;
# --help lists them.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m soft_ds.cli bench gpu-check "$@"
