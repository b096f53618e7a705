"""`soft-ds eval`: score every exit of exported checkpoints, and report the small-scale reproduction.

    soft-ds eval lm --model sft=exported/sft --model soft=exported/soft --exits 2,4,6,8 \\
        --data data/alpaca_5000.json --val-size 200 --seed 1234 --out eval
    soft-ds eval kl --model soft=exported/soft --reference sft=exported/sft --exits 2,4,6,8 \\
        --data data/alpaca_5000.json --out eval
    soft-ds eval judge --a soft=exported/soft --b sft=exported/sft --a-exits 4,8 --b-exits 4,8 \\
        --judge models/PandaLM-7B-v1 --out eval
    soft-ds eval triviaqa --model soft=exported/soft --exits 2,4,6,8 \\
        --data triviaqa/validation.parquet --out eval
    soft-ds eval answers --model base=models/smollm2-135m --model soft=exported/soft \\
        --config ds_configs/reproduce_real.json --num-prompts 6 --out eval
    soft-ds eval claims runs/reproduce_small          (runs/reproduce_real: add --goals real)

Models are exported Hugging Face checkpoint directories, given as NAME=DIR (or DIR, named after its
folder). lm, kl, answers, judge and triviaqa write JSON, a markdown table (and a PNG) into --out (created if
needed; files of the same name are replaced); claims writes OUT/report.md. Bad input (missing
file, wrong format, exit out of range) stops a sub-command with one `error:` line and exit code 2
before anything is written.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
from pathlib import Path

import torch

from soft_ds.checkpoint import read_checkpoint_meta
from soft_ds.config import load_config
from soft_ds.settings import TEMPLATES, SoftOptions, add_flags
from soft_ds.data.records import BUNDLED_INSTRUCTIONS, BUNDLED_RECORDS, load_instructions
from soft_ds.data.templates import encode_prompt
from soft_ds.data.tokenizer import load_tokenizer
from soft_ds.eval import claims, judge, metrics, triviaqa
from soft_ds.eval.inputs import (held_out_records, open_checkpoint, parse_spec, parse_specs, shared_template,
                                 shared_tokenizer)
from soft_ds.eval.report import (check_out_dir, exit_lines, exit_table, heat_map, line_plot, markdown_table,
                                write_outputs)
from soft_ds.inference import DTYPES
from soft_ds.settings import ArgumentParser

COMMAND_HELP = ("Score every exit of exported checkpoints: loss, KL, side-by-side answers, PandaLM judge, TriviaQA; "
                "a reproduction's claims.")


# --------------------------------------------------------------------------------------------
# Arguments


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=COMMAND_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    commands = p.add_subparsers(dest="command", required=True, metavar="{lm,kl,answers,judge,triviaqa,claims}")

    def sub_command(name: str, summary: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, description=summary)

    lm = sub_command("lm", "loss and perplexity of every exit on held-out Alpaca records")
    add_models(lm)
    add_held_out(lm)
    add_common(lm, batch_size=8)
    lm.set_defaults(run=run_lm)

    kl = sub_command("kl", "KL(reference || exit) by output token position (paper Figure 2)")
    add_models(kl)
    kl.add_argument("--reference", metavar="NAME=DIR",
                    help="the model whose greedy responses are scored and whose last layer is the reference "
                         "distribution (default: each model's own last layer, on its own responses)")
    add_held_out(kl)
    kl.add_argument("--num-prompts", type=int, default=32, help="held-out records used as prompts (the first N)")
    kl.add_argument("--max-new-tokens", type=int, default=64, help="longest response generated")
    add_common(kl, batch_size=8)
    kl.set_defaults(run=run_kl)

    pair = sub_command("judge", "PandaLM pairwise judgement of system A's exits against system B's")
    pair.add_argument("--a", required=True, metavar="NAME=DIR", help="system A")
    pair.add_argument("--b", required=True, metavar="NAME=DIR", help="system B")
    pair.add_argument("--a-exits", help="A's exits, comma-separated or 'all' (default: its last layer)")
    pair.add_argument("--b-exits", help="B's exits (default: its last layer); the grid is A's exits x B's")
    pair.add_argument("--judge", required=True, metavar="DIR",
                      help="judge model: a local Hugging Face causal LM directory (PandaLM-7B-v1 for real use)")
    pair.add_argument("--instructions", default=BUNDLED_INSTRUCTIONS,
                      help="JSON list of {instruction, input} (default: PandaLM's 170 test instructions)")
    pair.add_argument("--limit", type=int, help="use only the first N instructions")
    pair.add_argument("--max-new-tokens", type=int, default=128, help="longest response generated per system")
    pair.add_argument("--judge-max-new-tokens", type=int, default=16,
                      help="tokens the judge generates (the verdict is its first line; PandaLM itself allows 512 "
                           "for its reason and reference answer)")
    pair.add_argument("--judge-beams", type=int, default=1, help="judge beam search width (PandaLM's script: 4)")
    pair.add_argument("--judge-repetition-penalty", type=float, default=1.0, help="(PandaLM's script: 1.2)")
    pair.add_argument("--judge-batch-size", type=int, default=4, help="judge prompts decoded together")
    add_common(pair, batch_size=8)
    pair.set_defaults(run=run_judge)

    answers = sub_command("answers", "every exit's greedy answers to held-out instructions, side by side")
    add_models(answers)
    add_held_out(answers)
    answers.add_argument("--num-prompts", type=int, default=6, help="held-out records answered (the first N)")
    answers.add_argument("--max-new-tokens", type=int, default=48, help="longest answer generated")
    add_common(answers, batch_size=8)
    answers.set_defaults(run=run_answers)

    qa = sub_command("triviaqa", "TriviaQA closed-book exact match and F1 of every exit")
    add_models(qa)
    qa.add_argument("--data", required=True,
                    help="TriviaQA: datasets-layout .json/.jsonl/.parquet or save_to_disk folder, or the original "
                         "release's JSON ({'Data': [...]})")
    qa.add_argument("--split", help="split of a save_to_disk DatasetDict folder (e.g. validation)")
    qa.add_argument("--limit", type=int, help="use only the first N questions")
    qa.add_argument("--prompt-style", choices=triviaqa.PROMPT_STYLES, default="qa",
                    help="qa: 'Answer these questions:\\nQ: ...\\nA:' (zero-shot); alpaca: the question as an "
                         "instruction in the training template")
    qa.add_argument("--max-new-tokens", type=int, default=24, help="longest answer generated")
    add_common(qa, batch_size=16)
    qa.set_defaults(run=run_triviaqa)

    report = sub_command("claims", "a reproduction's report: the per-exit table of SFT, SFT+ICT and SoFT and the "
                                   "paper's claims, PASS or MISS")
    report.add_argument("out", help="the output folder of tools/reproduce_small.sh or tools/reproduce_real.sh "
                                    "(report.md is written there)")
    report.add_argument("--goals", choices=sorted(claims.TITLES), default="small",
                        help="small: perplexity ratios (a toy model trained from scratch); real: losses in nats a "
                             "pretrained model's exits must reach (tools/reproduce_real.sh)")
    report.set_defaults(run=run_claims)
    return p


def add_models(p):
    p.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                   help="an exported checkpoint; repeat for several models")
    p.add_argument("--exits", help="comma-separated exits, or 'all' (default: the training default for each "
                                   "model's depth, e.g. 2,4,6,8 for 8 layers)")


def add_held_out(p):
    p.add_argument("--data", default=BUNDLED_RECORDS,
                   help="the Alpaca file training used; its held-out split is evaluated")
    p.add_argument("--config", metavar="FILE|RUN",
                   help="the training config (ds_configs/*.json), or the training run's --output-dir (the "
                        "settings its latest checkpoint recorded, command-line overrides included): its "
                        "soft.val_size, seed and seq_len (the same values give the same held-out records, cut "
                        "the same way), and its exits for --exits, wherever those options are not given")
    add_flags(p, ["val_size", "seed", "seq_len"], source="--config")


def training_settings(config: str) -> SoftOptions:
    """The "soft" settings of a training config file, or of a run directory's latest checkpoint."""
    if not os.path.isdir(config):
        return load_config(config).soft
    # No checkpoint, or one of another format version: a CheckpointError naming the directory.
    return SoftOptions(**read_checkpoint_meta(config)["soft"])


def resolve_held_out(args):
    """Fill the held-out split's options not given from --config (else the training defaults), and
    --exits from the config's exits (a bad config file stops here, with its own error)."""
    soft = training_settings(args.config) if args.config else SoftOptions()
    for name in ("val_size", "seed", "seq_len"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(soft, name))
    if args.exits is None and args.config and soft.exits:
        args.exits = ",".join(map(str, soft.exits))


def add_common(p, batch_size: int):
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch-size", type=int, default=batch_size, help="records or prompts per forward")
    p.add_argument("--tokenizer", help="tokenizer directory or tokenizer.model (default: each checkpoint's own)")
    p.add_argument("--template", choices=TEMPLATES,
                   help="prompt template of records and prompts (default: the one each export records, else "
                        "alpaca; triviaqa's prompts follow --prompt-style instead)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights and activations")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")


def check_options(args, *positive):
    """--out can become a directory, and every option named in `positive`, when given, is at least 1."""
    check_out_dir(Path(args.out))
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def given_tokenizer(args):
    """--tokenizer, loaded once for every checkpoint; None: each checkpoint's own."""
    return load_tokenizer(args.tokenizer) if args.tokenizer else None


def open_models(args, tokenizer) -> list:
    """The --model checkpoints with their --exits."""
    return [open_checkpoint(name, path, args.exits, tokenizer, template=args.template)
            for name, path in parse_specs(args.model).items()]


# --------------------------------------------------------------------------------------------
# Sub-commands: check everything, evaluate, then write and print


def run_lm(args):
    resolve_held_out(args)
    check_options(args, "batch_size", "seq_len")
    checkpoints = open_models(args, given_tokenizer(args))
    tokenizer = shared_tokenizer(checkpoints)
    template = shared_template(checkpoints)
    val_set = held_out_records(args.data, tokenizer, args.seq_len, args.val_size, args.seed, template)

    results = metrics.lm_by_exit(checkpoints, val_set, tokenizer.pad_token_id, args.batch_size, DTYPES[args.dtype],
                                 args.device)
    report = {"data": str(args.data), "val_size": args.val_size, "seed": args.seed, "seq_len": args.seq_len,
              "template": template, "records": len(val_set), "loss": "mean cross-entropy (nats) per response token, eos included",
              "models": results}
    table = (f"Held-out loss and perplexity per exit: {len(val_set)} records of {args.data} "
             f"(val_size {args.val_size}, seed {args.seed}), response tokens only.\n\n"
             + exit_table(results, [("loss", "loss"), ("ppl", "ppl")]))
    lines = exit_lines(results, "ppl")
    write_outputs(Path(args.out), {"lm.json": report, "lm.md": table},
                  [("ppl_vs_exit.png", line_plot([("held-out perplexity per exit", lines)], "exit layer",
                                                 "perplexity", log_y=True))])
    print(table)
    return report


def run_kl(args):
    resolve_held_out(args)
    check_options(args, "batch_size", "seq_len", "num_prompts", "max_new_tokens")
    tokenizer = given_tokenizer(args)
    checkpoints = open_models(args, tokenizer)
    reference = None
    if args.reference:
        name, path = parse_spec(args.reference, "--reference")
        reference = open_checkpoint(name, path, None, tokenizer, template=args.template)
    metrics.check_reference(checkpoints, reference)
    tokenizer = shared_tokenizer(checkpoints + ([reference] if reference else []))
    template = shared_template(checkpoints + ([reference] if reference else []))
    records = list(held_out_records(args.data, tokenizer, args.seq_len, args.val_size, args.seed, template))
    prompts = [encode_prompt(record, tokenizer, template) for record in records[:args.num_prompts]]

    results, texts = metrics.kl_by_exit(checkpoints, reference, prompts, tokenizer, args.max_new_tokens,
                                        args.batch_size, DTYPES[args.dtype], args.device)
    report = {"data": str(args.data), "val_size": args.val_size, "seed": args.seed, "template": template,
              "prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens, "decoding": "greedy",
              "reference": ({"name": reference.name, "path": str(reference.path)} if reference
                            else "each model's own last layer, on its own responses"),
              "kl": "KL(reference || exit) in nats of the distribution that predicts response token i+1 (kl[0]: the "
                    "first generated token; the plot numbers positions from 1), averaged over the count[i] "
                    "responses that reach it; mean: over all response tokens",
              "models": results}
    against = reference.name if reference else "each model's own last layer"
    table = (f"Mean KL(reference || exit) over response tokens; reference: {against}; {len(prompts)} held-out "
             f"prompts, greedy responses of up to {args.max_new_tokens} tokens.\n\n"
             + exit_table(results, [("mean", "mean KL")]))
    panels = [(f"{name} exits vs {r['reference']}",
               {f"exit {n}": (list(range(1, len(v["kl"]) + 1)), v["kl"]) for n, v in r["exits"].items()})
              for name, r in results.items()]
    write_outputs(Path(args.out), {"kl.json": report, "kl.md": table, "kl_responses.json": texts},
                  [("kl_vs_position.png", line_plot(panels, "output token position", "KL (nats)"))])
    print(table)
    return report


def run_answers(args):
    resolve_held_out(args)
    check_options(args, "batch_size", "seq_len", "num_prompts", "max_new_tokens")
    checkpoints = open_models(args, given_tokenizer(args))
    tokenizer = shared_tokenizer(checkpoints)
    template = shared_template(checkpoints)
    records = list(held_out_records(args.data, tokenizer, args.seq_len, args.val_size, args.seed,
                                    template))[:args.num_prompts]
    prompts = [encode_prompt(record, tokenizer, template) for record in records]

    answers = {checkpoint.name: {str(n): texts for n, texts in metrics.responses_by_exit(
        checkpoint, prompts, args.max_new_tokens, args.batch_size, DTYPES[args.dtype], args.device).items()}
        for checkpoint in checkpoints}
    report = {"data": str(args.data), "val_size": args.val_size, "seed": args.seed, "template": template,
              "decoding": f"greedy, up to {args.max_new_tokens} tokens",
              "records": [{key: record[key] for key in ("instruction", "input", "output")} for record in records],
              "models": answers}
    page = answers_page(report)
    write_outputs(Path(args.out), {"answers.json": report, "answers.md": page}, [])
    print(page)
    return report


def answers_page(report: dict) -> str:
    """Markdown: per held-out instruction, a table with a row per exit and a column per model."""
    def cell(text: str) -> str:
        text = html.escape(text.strip(), quote=False).replace("|", "\\|").replace("\n", "<br>")
        return text or "*(nothing)*"
    models = report["models"]
    exits = sorted({int(n) for by_exit in models.values() for n in by_exit})
    data = os.path.relpath(report["data"]) if Path(report["data"]).resolve().is_relative_to(Path.cwd()) else \
        report["data"]  # the bundled file as data/alpaca_5000.json, not this machine's absolute path
    lines = [f"Answers ({report['decoding']}) of every exit to held-out records of {data} "
             f"(val_size {report['val_size']}, seed {report['seed']}, {report['template']} template).", ""]
    for i, record in enumerate(report["records"]):
        lines += [f"### {i + 1}. {cell(record['instruction'])}", ""]
        if record["input"]:
            lines += [f"Input: {cell(record['input'])}", ""]
        lines += [f"Reference: {cell(record['output'])}", "",
                  "| exit | " + " | ".join(models) + " |", "|---:|" + "---|" * len(models)]
        lines += [f"| {n} | " + " | ".join(cell(by_exit[str(n)][i]) if str(n) in by_exit else "" for by_exit in
                                          models.values()) + " |" for n in exits]
        lines.append("")
    return "\n".join(lines)


def run_judge(args):
    check_options(args, "batch_size", "limit", "max_new_tokens", "judge_max_new_tokens", "judge_beams",
                  "judge_batch_size")
    if args.judge_repetition_penalty <= 0:
        raise ValueError(f"--judge-repetition-penalty must be positive, got {args.judge_repetition_penalty}")
    tokenizer = given_tokenizer(args)
    systems = {}
    for role in ("a", "b"):
        name, path = parse_spec(getattr(args, role), f"--{role}")
        systems[role] = open_checkpoint(name, path, getattr(args, f"{role}_exits"), tokenizer, last_by_default=True,
                                        what=f"system {role.upper()} ({name})", flag=f"--{role}-exits",
                                        template=args.template)
    records = load_instructions(args.instructions)[:args.limit]
    judge_model = judge.HFJudge(args.judge, device=args.device, dtype=DTYPES[args.dtype],
                                max_new_tokens=args.judge_max_new_tokens, num_beams=args.judge_beams,
                                repetition_penalty=args.judge_repetition_penalty, batch_size=args.judge_batch_size)

    a, b = systems["a"], systems["b"]
    grid = judge.judge_grid(a, b, records, judge_model, args.max_new_tokens, args.batch_size, DTYPES[args.dtype],
                            args.device)
    cells = grid["cells"]
    unparsed = sum(cell["unparsed"] for cell in cells)
    report = {"a": {"name": a.name, "path": str(a.path), "exits": list(a.exits)},
              "b": {"name": b.name, "path": str(b.path), "exits": list(b.exits)},
              "judge": str(args.judge), "instructions": str(args.instructions), "records": len(records),
              "generation": {"decoding": "greedy", "max_new_tokens": args.max_new_tokens},
              "judge_generation": {"num_beams": args.judge_beams, "max_new_tokens": args.judge_max_new_tokens,
                                   "repetition_penalty": args.judge_repetition_penalty},
              "score": "(wins - losses) / records of A, per order (a_first: A is Response 1), averaged over the two "
                       "orders; unparsed judge outputs count in records but neither as win nor loss",
              "unparsed": unparsed, "cells": cells}
    header = [f"{a.name} exit", f"{b.name} exit", "score", "A first W/L/T", "B first W/L/T", "unparsed"]
    rows = [[c["a_exit"], c["b_exit"], c["score"],
             "/".join(str(c["a_first"][k]) for k in ("wins", "losses", "ties")),
             "/".join(str(c["b_first"][k]) for k in ("wins", "losses", "ties")), c["unparsed"]] for c in cells]
    table = (f"PandaLM protocol, {a.name} (A) vs {b.name} (B), judge {args.judge}, {len(records)} instructions; "
             "W/L/T are A's wins/losses/ties.\n\n" + markdown_table(header, rows))
    matrix = [[next(c["score"] for c in cells if c["a_exit"] == a_exit and c["b_exit"] == b_exit)
               for b_exit in b.exits] for a_exit in a.exits]
    responses = {role: {str(n): texts for n, texts in by_exit.items()} for role, by_exit in grid["responses"].items()}
    write_outputs(Path(args.out),
                  {"judge.json": report, "judge.md": table, "judge_responses.json": responses,
                   "judge_outputs.json": grid["judgements"]},
                  [("judge_grid.png", heat_map(matrix, [str(n) for n in a.exits], [str(n) for n in b.exits],
                                               f"{a.name} vs {b.name}: score of {a.name}",
                                               f"{a.name} exit", f"{b.name} exit"))])
    print(table)
    if unparsed:
        print(f"warning: {unparsed} of {2 * len(records) * len(cells)} judge outputs could not be parsed as "
              "1, 2 or Tie; they are counted as 'unparsed' (see judge.json and judge_outputs.json)", file=sys.stderr)
    return report


def run_triviaqa(args):
    check_options(args, "batch_size", "limit", "max_new_tokens")
    checkpoints = open_models(args, given_tokenizer(args))
    questions = triviaqa.load_triviaqa(args.data, args.split)[:args.limit]

    results, predictions = triviaqa.triviaqa_by_exit(checkpoints, questions, args.prompt_style, args.max_new_tokens,
                                                     args.batch_size, DTYPES[args.dtype], args.device)
    report = {"data": str(args.data), "split": args.split, "questions": len(questions),
              "prompt_style": args.prompt_style,
              "prompt": (triviaqa.QA_PROMPT if args.prompt_style == "qa"
                         else "the training template, the question as the instruction"),
              "decoding": f"greedy, up to {args.max_new_tokens} tokens; the answer is the first line",
              "scores": "exact match and token F1 after TriviaQA's normalisation, best over the gold answers, "
                        "averaged over questions (0..1)",
              "models": results}
    table = (f"TriviaQA closed-book, {len(questions)} questions of {args.data}, prompt style "
             f"{args.prompt_style!r}.\n\n" + exit_table(results, [("em", "EM"), ("f1", "F1")]))
    panels = [(f"TriviaQA {metric.upper()} per exit", exit_lines(results, metric)) for metric in ("em", "f1")]
    write_outputs(Path(args.out), {"triviaqa.json": report, "triviaqa.md": table,
                                   "triviaqa_predictions.json": predictions},
                  [("triviaqa_vs_exit.png", line_plot(panels, "exit layer", "score"))])
    print(table)
    return report


def run_claims(args):
    out = Path(args.out)
    text = claims.reproduction_report(out, args.goals)
    (out / "report.md").write_text(text)
    print(text)
    return text


def main(argv=None):
    """`soft-ds eval SUB ...`; returns what the sub-command wrote as its report (a dict; claims: the text)."""
    args = build_parser().parse_args(argv)
    return args.run(args)
