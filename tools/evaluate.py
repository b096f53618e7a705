#!/usr/bin/env python
"""Evaluate exported checkpoints exit by exit: loss and perplexity, KL by position, PandaLM judge, TriviaQA.

    python tools/evaluate.py lm --model sft=exported/sft --model soft=exported/soft --exits 2,4,6,8 \\
        --data data/alpaca_5000.json --val_size 200 --seed 1234 --out eval
    python tools/evaluate.py kl --model soft=exported/soft --reference sft=exported/sft --exits 2,4,6,8 \\
        --data data/alpaca_5000.json --out eval
    python tools/evaluate.py judge --a soft=exported/soft --b sft=exported/sft --a-exits 4,8 --b-exits 4,8 \\
        --judge models/PandaLM-7B-v1 --out eval
    python tools/evaluate.py triviaqa --model soft=exported/soft --exits 2,4,6,8 \\
        --data triviaqa/validation.parquet --out eval

Models are exported Hugging Face directories (tools/export_hf.py), given as NAME=DIR (or DIR, named
after its folder). Each sub-command writes JSON, a markdown table and a PNG into --out (created if
needed; files of the same name are replaced). Bad input (missing file, wrong format, exit out of
range) stops it with one `error:` line and exit code 2 before anything is written.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from soft_ds import evaluate, judge, triviaqa  # noqa: E402
from soft_ds.config import SoftOptions  # noqa: E402
from soft_ds.data import DataError, build_datasets, encode_prompt, load_instructions, load_tokenizer  # noqa: E402
from soft_ds.exits import default_exit_layers  # noqa: E402
from soft_ds.hf_io import CheckpointError, load_llama_config, load_model  # noqa: E402
from soft_ds.inference import DTYPES, SoftGenerator, checkpoint_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PANDALM_INSTRUCTIONS = REPO / "data" / "pandalm_testset_inference_v1.json"
INPUT_ERRORS = (CheckpointError, DataError, judge.JudgeError, ValueError)


# --------------------------------------------------------------------------------------------
# Arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    commands = p.add_subparsers(dest="command", required=True, metavar="{lm,kl,judge,triviaqa}")

    lm = commands.add_parser("lm", help="loss and perplexity of every exit on held-out Alpaca records")
    add_models(lm)
    add_held_out(lm)
    add_common(lm, batch_size=8)
    lm.set_defaults(run=run_lm, parser=lm)

    kl = commands.add_parser("kl", help="KL(reference || exit) by output token position (paper Figure 2)")
    add_models(kl)
    kl.add_argument("--reference", metavar="NAME=DIR",
                    help="the model whose greedy responses are scored and whose last layer is the reference "
                         "distribution (default: each model's own last layer, on its own responses)")
    add_held_out(kl)
    kl.add_argument("--num-prompts", type=int, default=32, help="held-out records used as prompts (the first N)")
    kl.add_argument("--max-new-tokens", type=int, default=64, help="longest response generated")
    add_common(kl, batch_size=8)
    kl.set_defaults(run=run_kl, parser=kl)

    pair = commands.add_parser("judge", help="PandaLM pairwise judgement of system A's exits against system B's")
    pair.add_argument("--a", required=True, metavar="NAME=DIR", help="system A")
    pair.add_argument("--b", required=True, metavar="NAME=DIR", help="system B")
    pair.add_argument("--a-exits", help="A's exits, comma-separated or 'all' (default: its last layer)")
    pair.add_argument("--b-exits", help="B's exits (default: its last layer); the grid is A's exits x B's")
    pair.add_argument("--judge", required=True, metavar="DIR",
                      help="judge model: a local Hugging Face causal LM directory (PandaLM-7B-v1 for real use)")
    pair.add_argument("--instructions", default=str(PANDALM_INSTRUCTIONS),
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
    pair.set_defaults(run=run_judge, parser=pair)

    qa = commands.add_parser("triviaqa", help="TriviaQA closed-book exact match and F1 of every exit")
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
    qa.set_defaults(run=run_triviaqa, parser=qa)
    return p


def add_models(p):
    p.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                   help="an exported checkpoint; repeat for several models")
    p.add_argument("--exits", help="comma-separated exits, or 'all' (default: the training default for each "
                                   "model's depth, e.g. 2,4,6,8 for 8 layers)")


def add_held_out(p):
    defaults = SoftOptions()
    p.add_argument("--data", default=str(REPO / "data" / "alpaca_5000.json"),
                   help="the Alpaca file training used; its held-out split is evaluated")
    p.add_argument("--val_size", "--val-size", type=int, default=defaults.val_size,
                   help="held-out records, as in training (same val_size and seed = the same records)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="training's data seed")
    p.add_argument("--max_length", "--max-length", type=int, default=defaults.seq_len,
                   help="tokens per record, as training's seq_len (longer records are cut the same way)")


def add_common(p, batch_size: int):
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch-size", type=int, default=batch_size, help="records or prompts per forward")
    p.add_argument("--tokenizer", help="tokenizer directory or tokenizer.model (default: each checkpoint's own)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights and activations")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")


def parse_spec(parser, spec: str, flag: str) -> tuple[str, Path]:
    """NAME=DIR -> (NAME, DIR); a bare DIR is named after its folder."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec).name, spec
    if not name.strip() or not path.strip():
        parser.error(f"{flag} {spec!r}: expected NAME=DIR")
    return name.strip(), Path(path)


def parse_models(parser, specs: list[str]) -> dict[str, Path]:
    models = {}
    for spec in specs:
        name, path = parse_spec(parser, spec, "--model")
        if name in models:
            parser.error(f"--model: the name {name!r} is given twice; name each model (NAME=DIR)")
        models[name] = path
    return models


def parse_exits(parser, text: str | None, num_layers: int, what: str, flag: str = "--exits") -> tuple[int, ...]:
    """--exits text for one model: 'all', comma-separated layers, or None for the training default."""
    if text is None:
        return default_exit_layers(num_layers)
    if text.strip() == "all":
        return tuple(range(1, num_layers + 1))
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        parser.error(f"{flag} must be comma-separated integers or 'all', got {text!r}")
    try:
        return evaluate.check_exit_layers(layers, num_layers, what)
    except ValueError as error:
        parser.error(f"{flag} {text}: {error}")


def check_options(parser, args, *positive):
    """--out can become a directory, and every option named in `positive`, when given, is at least 1."""
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} exists and is not a directory")
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def read_configs(parser, models: dict[str, Path]) -> dict:
    try:
        return {name: load_llama_config(path) for name, path in models.items()}
    except CheckpointError as error:
        parser.error(str(error))


def tokenizer_for(parser, args, name: str, path: Path):
    """--tokenizer if given, else the checkpoint's own; error if neither exists."""
    try:
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else checkpoint_tokenizer(path)
    except DataError as error:
        parser.error(str(error))
    if tokenizer is None:
        parser.error(f"{name} ({path}) holds no tokenizer; pass --tokenizer")
    return tokenizer


def one_tokenizer(parser, args, models: dict[str, Path], configs: dict):
    """The tokenizer every model's held-out data is encoded with; models must agree on it, or their
    losses would be over different tokens."""
    tokenizers = {name: tokenizer_for(parser, args, name, path) for name, path in models.items()}
    first_name, first = next(iter(tokenizers.items()))
    for name, tokenizer in tokenizers.items():
        if tokenizer.get_vocab() != first.get_vocab():
            parser.error(f"{name} and {first_name} have different tokenizers: their per-token losses are not "
                         "comparable (pass one --tokenizer if they really share a vocabulary)")
        if len(tokenizer) > configs[name].vocab_size:
            parser.error(f"the tokenizer has {len(tokenizer)} tokens but {name}'s vocabulary is "
                         f"{configs[name].vocab_size}: tokenizer and model do not match")
    return first


def held_out(parser, args, tokenizer):
    if args.val_size < 1:
        parser.error(f"--val_size must be at least 1 to have held-out records, got {args.val_size}")
    try:
        _, val_set = build_datasets(args.data, tokenizer, args.max_length, args.val_size, args.seed)
    except (DataError, ValueError) as error:
        parser.error(str(error))
    if len(val_set) == 0:
        parser.error(f"{args.data}: no held-out record has a response within --max_length {args.max_length}")
    return val_set


def load(parser, args, path: Path):
    try:
        return load_model(path, dtype=DTYPES[args.dtype], device=args.device)
    except INPUT_ERRORS as error:
        parser.error(str(error))


# --------------------------------------------------------------------------------------------
# Output


def write_outputs(out: Path, files: dict[str, object], plots: list) -> None:
    """JSON (dicts and lists) and text files, then plots (callables path -> None) into out."""
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content, indent=2, ensure_ascii=False) + "\n"
        (out / name).write_text(text, encoding="utf-8")
    try:
        import matplotlib
        matplotlib.use("Agg")
    except ImportError:
        print("note: matplotlib is not installed (pip install matplotlib): no PNG written", file=sys.stderr)
        plots = []
    for name, draw in plots:
        draw(out / name)
    print(f"wrote {', '.join(list(files) + [name for name, _ in plots])} to {out}", file=sys.stderr)


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(value):
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4g}" if abs(value) >= 1e4 else f"{value:.4f}"
        return str(value)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def exit_table(results: dict, columns: list[tuple[str, str]]) -> str:
    """Markdown: a row per exit, a column per (model, (key, label)); empty where a model lacks the exit."""
    exits = sorted({int(n) for r in results.values() for n in r["exits"]})
    header = ["exit"] + [f"{name} {label}" for name in results for _, label in columns]
    rows = [[n] + [r["exits"][str(n)][key] if str(n) in r["exits"] else "" for r in results.values()
                   for key, _ in columns] for n in exits]
    return markdown_table(header, rows)


def exit_lines(results: dict, key: str) -> dict:
    """{model: (exits, values of key)} for line_plot."""
    return {name: ([int(n) for n in r["exits"]], [v[key] for v in r["exits"].values()]) for name, r in results.items()}


def line_plot(panels: list[tuple[str, dict]], xlabel: str, ylabel: str, log_y: bool = False):
    """A drawing function: one panel per (title, {label: (xs, ys)}), one line per label."""
    def draw(path: Path):
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
        for axis, (title, lines) in zip(axes[0], panels):
            for label, (xs, ys) in lines.items():
                axis.plot(xs, ys, "o-" if len(xs) <= 12 else "-", label=label, markersize=4)
            axis.set(xlabel=xlabel, ylabel=ylabel, title=title)
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # exits and positions are whole numbers
            if log_y:
                axis.set_yscale("log")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return draw


def heat_map(matrix: list[list[float]], rows: list[str], columns: list[str], title: str,
             row_label: str, column_label: str):
    def draw(path: Path):
        import matplotlib.pyplot as plt
        fig, axis = plt.subplots(figsize=(max(4.5, 2.5 + 0.9 * len(columns)), 1.5 + 0.7 * len(rows)))
        image = axis.imshow(matrix, cmap="RdYlGn", vmin=-1, vmax=1)
        axis.set_xticks(range(len(columns)), columns)
        axis.set_yticks(range(len(rows)), rows)
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                axis.text(j, i, f"{value:+.2f}", ha="center", va="center", fontsize=8)
        axis.set(xlabel=column_label, ylabel=row_label, title=title)
        fig.colorbar(image, ax=axis, label="score (W - L) / T")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return draw


# --------------------------------------------------------------------------------------------
# Sub-commands


def run_lm(parser, args):
    models = parse_models(parser, args.model)
    check_options(parser, args, "batch_size", "max_length")
    configs = read_configs(parser, models)
    exits = {name: parse_exits(parser, args.exits, configs[name].num_hidden_layers, name) for name in models}
    tokenizer = one_tokenizer(parser, args, models, configs)
    val_set = held_out(parser, args, tokenizer)

    results = {}
    for name, path in models.items():
        model = load(parser, args, path)
        metrics = evaluate.lm_metrics(model, val_set, exits[name], tokenizer.pad_token_id, args.batch_size,
                                      desc=f"loss {name}")
        results[name] = {"path": str(path), "num_layers": configs[name].num_hidden_layers,
                         "exits": {str(n): values for n, values in metrics.items()}}
        del model
    report = {"data": str(args.data), "val_size": args.val_size, "seed": args.seed, "max_length": args.max_length,
              "records": len(val_set), "loss": "mean cross-entropy (nats) per response token, eos included",
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


def run_kl(parser, args):
    models = parse_models(parser, args.model)
    check_options(parser, args, "batch_size", "max_length", "num_prompts", "max_new_tokens")
    reference_spec = parse_spec(parser, args.reference, "--reference") if args.reference else None
    if reference_spec and models.get(reference_spec[0], reference_spec[1]) != reference_spec[1]:
        parser.error(f"--reference {args.reference}: the name {reference_spec[0]!r} is a --model with another path")
    everything = dict(models, **({reference_spec[0]: reference_spec[1]} if reference_spec else {}))
    configs = read_configs(parser, everything)
    if reference_spec:
        different = [name for name in models if configs[name].vocab_size != configs[reference_spec[0]].vocab_size]
        if different:
            parser.error(f"{', '.join(different)}: vocabulary size differs from the reference "
                         f"{reference_spec[0]}'s ({configs[reference_spec[0]].vocab_size}); KL needs one vocabulary")
    exits = {name: parse_exits(parser, args.exits, configs[name].num_hidden_layers, name) for name in models}
    tokenizer = one_tokenizer(parser, args, everything, configs)
    records = list(held_out(parser, args, tokenizer))[:args.num_prompts]
    prompts = [encode_prompt(record, tokenizer) for record in records]
    eos = tokenizer.eos_token_id

    def respond(model, name):
        generator = SoftGenerator(model, tokenizer)
        return evaluate.generate_responses(generator, prompts, None, args.max_new_tokens, eos, args.batch_size,
                                           desc=f"responses of {name}")

    reference = responses = None
    texts = {}
    if reference_spec:
        reference = load(parser, args, reference_spec[1])
        responses = respond(reference, reference_spec[0])
        texts[reference_spec[0]] = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    results = {}
    for name, path in models.items():
        # The reference's own exits are read from the very same object (its last exit's KL is then 0).
        model = reference if reference_spec and path == reference_spec[1] else load(parser, args, path)
        own = responses is None
        model_responses = respond(model, name) if own else responses
        if own:
            texts[name] = [tokenizer.decode(r, skip_special_tokens=True) for r in model_responses]
        kl = evaluate.kl_by_position(model, model if own else reference, prompts, model_responses, exits[name],
                                     batch_size=args.batch_size, pad_id=tokenizer.pad_token_id, desc=f"KL {name}")
        reference_name = reference_spec[0] if reference_spec else f"{name} (own last layer)"
        results[name] = {"path": str(path), "reference": reference_name,
                         "exits": {str(n): values for n, values in kl.items()}}
        del model
    report = {"data": str(args.data), "val_size": args.val_size, "seed": args.seed, "prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens, "decoding": "greedy",
              "reference": ({"name": reference_spec[0], "path": str(reference_spec[1])} if reference_spec
                            else "each model's own last layer, on its own responses"),
              "kl": "KL(reference || exit) in nats of the distribution that predicts response token i+1 (kl[0]: the "
                    "first generated token; the plot numbers positions from 1), averaged over the count[i] "
                    "responses that reach it; mean: over all response tokens",
              "models": results}
    against = reference_spec[0] if reference_spec else "each model's own last layer"
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


def run_judge(parser, args):
    check_options(parser, args, "batch_size", "limit", "max_new_tokens", "judge_max_new_tokens", "judge_beams",
                   "judge_batch_size")
    if args.judge_repetition_penalty <= 0:
        parser.error(f"--judge-repetition-penalty must be positive, got {args.judge_repetition_penalty}")
    systems = {"a": parse_spec(parser, args.a, "--a"), "b": parse_spec(parser, args.b, "--b")}
    configs = read_configs(parser, {role: path for role, (_, path) in systems.items()})
    exits = {role: parse_exits(parser, getattr(args, f"{role}_exits") or str(configs[role].num_hidden_layers),
                               configs[role].num_hidden_layers, f"system {role.upper()} ({name})", f"--{role}-exits")
             for role, (name, _) in systems.items()}
    tokenizers = {role: tokenizer_for(parser, args, name, path) for role, (name, path) in systems.items()}
    try:
        records = load_instructions(args.instructions)[:args.limit]
        judge_model = judge.HFJudge(args.judge, device=args.device, dtype=DTYPES[args.dtype],
                                    max_new_tokens=args.judge_max_new_tokens, num_beams=args.judge_beams,
                                    repetition_penalty=args.judge_repetition_penalty, batch_size=args.judge_batch_size)
    except INPUT_ERRORS as error:
        parser.error(str(error))

    responses = {}  # role -> exit -> texts; each exit of each system generates once for the whole grid
    for role, (name, path) in systems.items():
        model, tokenizer = load(parser, args, path), tokenizers[role]
        generator = SoftGenerator(model, tokenizer)
        prompts = [encode_prompt(record, tokenizer) for record in records]
        responses[role] = {}
        for n in exits[role]:
            tokens = evaluate.generate_responses(generator, prompts, n, args.max_new_tokens, tokenizer.eos_token_id,
                                                 args.batch_size, desc=f"{name} exit {n}")
            responses[role][n] = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
        del model, generator

    cells, judgements = [], []
    for a_exit in exits["a"]:
        for b_exit in exits["b"]:
            label = f"{systems['a'][0]}@{a_exit} vs {systems['b'][0]}@{b_exit}"
            result = judge.compare(records, responses["a"][a_exit], responses["b"][b_exit],
                                   lambda prompts: judge_model(prompts, desc=f"judging {label}"))
            cells.append({"a_exit": a_exit, "b_exit": b_exit, "score": result["score"],
                          "a_first": result["a_first"], "b_first": result["b_first"], "unparsed": result["unparsed"]})
            judgements.append({"a_exit": a_exit, "b_exit": b_exit, **result["judgements"],
                               "outcomes_for_a": result["outcomes"]})
    unparsed = sum(cell["unparsed"] for cell in cells)
    a_name, b_name = systems["a"][0], systems["b"][0]
    report = {"a": {"name": a_name, "path": str(systems["a"][1]), "exits": list(exits["a"])},
              "b": {"name": b_name, "path": str(systems["b"][1]), "exits": list(exits["b"])},
              "judge": str(args.judge), "instructions": str(args.instructions), "records": len(records),
              "generation": {"decoding": "greedy", "max_new_tokens": args.max_new_tokens},
              "judge_generation": {"num_beams": args.judge_beams, "max_new_tokens": args.judge_max_new_tokens,
                                   "repetition_penalty": args.judge_repetition_penalty},
              "score": "(wins - losses) / records of A, per order (a_first: A is Response 1), averaged over the two "
                       "orders; unparsed judge outputs count in records but neither as win nor loss",
              "unparsed": unparsed, "cells": cells}
    header = [f"{a_name} exit", f"{b_name} exit", "score", "A first W/L/T", "B first W/L/T", "unparsed"]
    rows = [[c["a_exit"], c["b_exit"], c["score"],
             "/".join(str(c["a_first"][k]) for k in ("wins", "losses", "ties")),
             "/".join(str(c["b_first"][k]) for k in ("wins", "losses", "ties")), c["unparsed"]] for c in cells]
    table = (f"PandaLM protocol, {a_name} (A) vs {b_name} (B), judge {args.judge}, {len(records)} instructions; "
             "W/L/T are A's wins/losses/ties.\n\n" + markdown_table(header, rows))
    matrix = [[next(c["score"] for c in cells if c["a_exit"] == a and c["b_exit"] == b) for b in exits["b"]]
              for a in exits["a"]]
    write_outputs(Path(args.out),
                  {"judge.json": report, "judge.md": table,
                   "judge_responses.json": {"a": {str(n): texts for n, texts in responses["a"].items()},
                                            "b": {str(n): texts for n, texts in responses["b"].items()}},
                   "judge_outputs.json": judgements},
                  [("judge_grid.png", heat_map(matrix, [str(n) for n in exits["a"]], [str(n) for n in exits["b"]],
                                               f"{a_name} vs {b_name}: score of {a_name}",
                                               f"{a_name} exit", f"{b_name} exit"))])
    print(table)
    if unparsed:
        print(f"warning: {unparsed} of {2 * len(records) * len(cells)} judge outputs could not be parsed as "
              "1, 2 or Tie; they are counted as 'unparsed' (see judge.json and judge_outputs.json)", file=sys.stderr)
    return report


def run_triviaqa(parser, args):
    models = parse_models(parser, args.model)
    check_options(parser, args, "batch_size", "limit", "max_new_tokens")
    configs = read_configs(parser, models)
    exits = {name: parse_exits(parser, args.exits, configs[name].num_hidden_layers, name) for name in models}
    tokenizers = {name: tokenizer_for(parser, args, name, path) for name, path in models.items()}
    try:
        questions = triviaqa.load_triviaqa(args.data, args.split)[:args.limit]
    except DataError as error:
        parser.error(str(error))

    results, predictions = {}, {}
    for name, path in models.items():
        model, tokenizer = load(parser, args, path), tokenizers[name]
        generator = SoftGenerator(model, tokenizer)
        prompts = [triviaqa.prompt_ids(q.question, tokenizer, args.prompt_style) for q in questions]
        results[name] = {"path": str(path), "exits": {}}
        predictions[name] = {}
        for n in exits[name]:
            tokens = evaluate.generate_responses(generator, prompts, n, args.max_new_tokens, tokenizer.eos_token_id,
                                                 args.batch_size, desc=f"{name} exit {n}")
            answers = [triviaqa.extract_answer(tokenizer.decode(t, skip_special_tokens=True)) for t in tokens]
            scores = triviaqa.score_predictions(questions, answers)
            results[name]["exits"][str(n)] = {"em": scores["em"], "f1": scores["f1"], "n": scores["n"]}
            predictions[name][str(n)] = [{"id": q.id, "prediction": a, **s}
                                         for q, a, s in zip(questions, answers, scores["per_question"])]
        del model, generator
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


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args.parser, args)  # errors print the sub-command's usage


if __name__ == "__main__":
    main()
