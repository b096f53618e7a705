"""The `soft-ds` command: one entry point, one subcommand per job.

    soft-ds --help                      the subcommands
    soft-ds COMMAND --help              one subcommand's options

Each subcommand is the `main(argv)` of the package module that owns the job (litgpt's layout: the
module is both the command and the library), imported only when that subcommand runs, so
`soft-ds plan` never imports DeepSpeed.

Errors: the library raises `ValueError` subclasses (ConfigError, DataError, CheckpointError, ...)
whose message names the problem; here they become one `error:` line on stderr and exit code 2
(`monitor.fail`, which train.py's ranks use too). What argparse can check (a flag's type and
choices) it reports itself, also with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from soft_ds.monitor import fail

# name: (module, its help line), or for a command with subcommands (name: {subcommand: (module,
# help line)}, its help line). Training proper is `deepspeed soft_ds/train.py ...` (the launcher
# starts one process per rank); `soft-ds train` is the same main() in this one process.
COMMANDS = {
    "train": ("soft_ds.train", "Sorted Fine-Tuning on a DeepSpeed pipeline (this process; launch ranks "
                               "with `deepspeed soft_ds/train.py`)"),
    "export": ("soft_ds.checkpoint", "a training checkpoint as a Hugging Face LLaMA directory (full model or exit N)"),
    "generate": ("soft_ds.inference.command", "text from an exported checkpoint: any exit, speculative, dynamic"),
    "eval": ("soft_ds.eval.command", "score every exit of exported checkpoints: loss, KL, judge, TriviaQA, claims"),
    "plan": ("soft_ds.costs", "per-stage memory and FLOPs of a pipeline run, before launching it"),
    "bench": ({
        "overhead": ("soft_ds.bench.overhead", "SoFT's optimizer-step time and peak memory per rank over SFT's, on a "
                                               "DeepSpeed pipeline of the 13B cost proxy"),
        "inference": ("soft_ds.bench.inference", "tokens/s per exit, self-speculative decoding and dynamic exit, on a "
                                                 "model and on the 13B cost proxy"),
        "gpu-check": ("soft_ds.bench.gpu_check", "acceptance check on one GPU: bf16 training per packed-attention "
                                                 "kernel against fp32, tokens/s and MFU, inference rows; PASS/FAIL"),
    }, "benchmarks: SoFT's training overhead over SFT, inference speed per exit, the GPU acceptance check"),
    "import-gguf": ("soft_ds.gguf_import", "a LLaMA GGUF file (default: the packaged SmolLM2-135M-Instruct) as a "
                                           "Hugging Face LLaMA directory"),
    "train-tokenizer": ("soft_ds.train_tokenizer", "train the small LLaMA-style SentencePiece tokenizer bundled in "
                                                    "data/tokenizer"),
}


def build_parser(prog: str, commands: dict, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     epilog=f"Run `{prog} COMMAND --help` for a command's options.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_line) in commands.items():
        # add_help=False: the command's own parser answers --help, with its real options.
        subparsers.add_parser(name, help=help_line, add_help=False)
    return parser


def dispatch(prog: str, commands: dict, description: str, argv: list[str]) -> None:
    if not argv or argv[0] not in commands:
        build_parser(prog, commands, description).parse_args(argv[:1] or ["--help"])  # help, or "invalid choice"
        return
    target, help_line = commands[argv[0]]
    if isinstance(target, dict):
        return dispatch(f"{prog} {argv[0]}", target, help_line, argv[1:])
    # A command's usage line names it as typed: argparse takes its default prog from argv[0].
    sys.argv[0] = f"{prog} {argv[0]}"
    importlib.import_module(target).main(argv[1:])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        dispatch("soft-ds", COMMANDS, "Sorted Fine-Tuning (SoFT) of LLaMA models on DeepSpeed pipelines.", argv)
    except ValueError as error:
        fail(str(error))


if __name__ == "__main__":
    main()
