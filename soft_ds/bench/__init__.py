"""`soft-ds bench BENCHMARK`: what SoFT costs and what its exits buy, measured.

    soft-ds bench overhead [options]     training: SoFT's step time and peak memory over SFT's
    soft-ds bench inference [options]    decoding speed per exit, self-speculative, dynamic exit
    soft-ds bench gpu-check [options]    acceptance check: bf16 training per attention kernel vs fp32, MFU

The package, one module per piece:
    proxy.py            the LLaMA 2 13B cost proxy both benchmarks measure
    overhead.py         `bench overhead`: launches overhead_worker.py with the deepspeed launcher
    overhead_worker.py  one pipeline rank of it
    inference.py        `bench inference`
    gpu_check.py        `bench gpu-check` (tools/gpu_check.sh): one device, training + inference, PASS/FAIL
Each benchmark's module is imported only when it runs (the overhead report never imports the
generator, the inference benchmark never imports DeepSpeed).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name: (module, its help line)
BENCHMARKS = {
    "overhead": ("soft_ds.bench.overhead", "SoFT's optimizer-step time and peak memory per rank over SFT's, on a "
                                           "DeepSpeed pipeline of the 13B cost proxy"),
    "inference": ("soft_ds.bench.inference", "tokens/s per exit, self-speculative decoding and dynamic exit, on a "
                                             "model and on the 13B cost proxy"),
    "gpu-check": ("soft_ds.bench.gpu_check", "acceptance check on one GPU: bf16 training per packed-attention kernel "
                                             "against fp32, tokens/s and MFU, inference rows; PASS/FAIL"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description="What SoFT costs over SFT in training, and what its exits buy "
                                                 "in decoding.",
                                     epilog="Run `soft-ds bench BENCHMARK --help` for a benchmark's options.")
    benchmarks = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (_, help_line) in BENCHMARKS.items():
        # add_help=False: the benchmark's own parser answers --help, with its real options.
        benchmarks.add_parser(name, help=help_line, add_help=False)
    if not argv or argv[0] not in BENCHMARKS:
        parser.parse_args(argv[:1] or ["--help"])  # prints help or the "invalid choice" error
        return
    # The benchmark's usage line names it as typed: argparse takes its default prog from argv[0].
    sys.argv[0] = f"{parser.prog} {argv[0]}"
    importlib.import_module(BENCHMARKS[argv[0]][0]).main(argv[1:])
