"""`soft-ds bench BENCHMARK`: what SoFT costs and what its exits buy, measured.

    soft-ds bench overhead [options]     training: SoFT's step time and peak memory over SFT's
    soft-ds bench inference [options]    decoding speed per exit, self-speculative, dynamic exit
    soft-ds bench gpu-check [options]    acceptance check: bf16 training per attention kernel vs fp32, MFU

The package, one module per piece (soft_ds/cli.py's COMMANDS dispatches to each):
    proxy.py            the LLaMA 2 13B cost proxy both benchmarks measure
    overhead.py         `bench overhead`: launches overhead_worker.py with the deepspeed launcher
    overhead_worker.py  one pipeline rank of it
    inference.py        `bench inference`
    gpu_check.py        `bench gpu-check` (tools/gpu_check.sh): one device, training + inference, PASS/FAIL
Each benchmark's module is imported only when it runs (the overhead report never imports the
generator, the inference benchmark never imports DeepSpeed).
"""
