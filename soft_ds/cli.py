"""The `soft-ds` command: one entry point, one subcommand per job.

    soft-ds --help                      the subcommands
    soft-ds COMMAND --help              one subcommand's options

Each subcommand is the `main(argv)` of the package module that owns the job (litgpt's layout: the
module is both the command and the library), imported only when that subcommand runs, so
`soft-ds plan` never imports DeepSpeed.

Errors: the library raises `ValueError` subclasses (ConfigError, DataError, CheckpointError, ...)
whose message names the problem; here they become one `error:` line on stderr and exit code 2.
Commands do not check their input a second time before calling the library.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name: (module, its help line). Training proper is `deepspeed soft_ds/train.py ...` (the launcher
# starts one process per rank); `soft-ds train` is the same main() in this one process.
COMMANDS = {
    "train": ("soft_ds.train", "Sorted Fine-Tuning on a DeepSpeed pipeline (this process; launch ranks "
                               "with `deepspeed soft_ds/train.py`)"),
    "export": ("soft_ds.checkpoint", "a training checkpoint as a Hugging Face LLaMA directory (full model or exit N)"),
    "generate": ("soft_ds.inference.generate", "text from an exported checkpoint: any exit, speculative, dynamic"),
    "eval": ("soft_ds.eval.command", "score every exit of exported checkpoints: loss, KL, judge, TriviaQA, claims"),
    "plan": ("soft_ds.plan", "per-stage memory and FLOPs of a pipeline run, before launching it"),
    "bench": ("soft_ds.bench", "benchmarks: SoFT's training overhead over SFT, inference speed per exit"),
    "import-gguf": ("soft_ds.gguf_import", "a LLaMA GGUF file (default: the packaged SmolLM2-135M-Instruct) as a "
                                           "Hugging Face LLaMA directory"),
    "train-tokenizer": ("soft_ds.train_tokenizer", "train the small LLaMA-style SentencePiece tokenizer bundled in "
                                                    "data/tokenizer"),
}


def parse_list(text: str, flag: str, kind=int) -> list:
    """A comma-separated command-line list ("12,16,40"); ValueError naming the flag. The one parser
    of such lists: exits, exit weights, draft exits."""
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise ValueError(f"{flag} must be comma-separated {what}, got {text!r}") from None


def fail(message: str) -> SystemExit:
    """One `error:` line on stderr; the caller raises the returned SystemExit (exit code 2)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="soft-ds", description="Sorted Fine-Tuning (SoFT) of LLaMA models on DeepSpeed pipelines.",
        epilog="Run `soft-ds COMMAND --help` for a command's options.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_line) in COMMANDS.items():
        # add_help=False: the command's own parser answers --help, with its real options.
        commands.add_parser(name, help=help_line, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv[:1] or ["--help"])  # prints help or the "invalid choice" error
        return
    module = importlib.import_module(COMMANDS[argv[0]][0])
    # A command's usage line names it as typed: argparse takes its default prog from argv[0].
    sys.argv[0] = f"soft-ds {argv[0]}"
    try:
        module.main(argv[1:])
    except ValueError as error:
        raise fail(str(error)) from None


if __name__ == "__main__":
    main()
