"""`soft-ds generate`: text from an exported SoFT checkpoint, at any exit, self-speculative, or
with dynamic exit.

    soft-ds generate --model exported/full --prompt "Name three primary colors."
    soft-ds generate --model exported/full --prompt "..." --exit 4
    soft-ds generate --model exported/full --prompt "..." --speculative-exit 4 --draft-tokens 3
    soft-ds generate --model exported/full --prompt "..." --speculative-exit 20 --draft-vocab 8192 \\
        --draft-stop 0.5 --adaptive-k
    soft-ds generate --model exported/full --instructions data/pandalm_testset_inference_v1.json \\
        --dynamic-threshold 0.9 --output answers.json
    soft-ds generate --model exported/full --prompt "..." --target-agreement 0.97 --stats

A prompt is formatted with the training template (`data.templates.encode_prompt`: the Alpaca
prompt, or the tokenizer's chat template; by default the one the export's config.json records,
else alpaca), as an instruction with --prompt or as Alpaca-style records ({"instruction", "input"})
with --instructions; --raw feeds the --prompt text as it is. Greedy unless --temperature > 0.

--target-agreement T is dynamic exit with per-exit thresholds calibrated first (calibrate.py): the
full model decodes --calibration-prompts held-out instructions (PandaLM records 85 on, or those of
--calibration-instructions), and each exit gets the lowest threshold whose stopped tokens agree
with the full model's greedy token at rate >= T (a Wilson lower bound at --calibration-level).
The thresholds and what they did on the calibration tokens are printed to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from soft_ds.settings import ArgumentParser, parse_list
from soft_ds.settings import TEMPLATES
from soft_ds.data.records import BUNDLED_RECORDS, load_instructions
from soft_ds.data.targets import frequent_tokens, response_token_counts
from soft_ds.data.templates import checkpoint_template, encode_prompt, encode_text
from soft_ds.data.tokenizer import load_tokenizer
from soft_ds.exits import check_exit_layer, check_exit_layers
from soft_ds.hf_io import CheckpointError, load_llama_config
from soft_ds.inference.core import (CONFIDENCE_MEASURES, DTYPES, Sampling, check_positive_integer, check_temperature,
                                    check_top_p)
from soft_ds.inference.calibrate import (calibrate, calibration_records, check_confidence_level,
                                         check_target_agreement, prefix_agreement)
from soft_ds.inference.dynamic import check_threshold
from soft_ds.inference.generator import SoftGenerator
from soft_ds.inference.speculative import check_draft_exit, check_draft_vocabulary_size

COMMAND_HELP = "Generate text with an exported SoFT checkpoint: any exit, self-speculative, or dynamic exit."


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=COMMAND_HELP, epilog="Examples: see the docstring of "
                                "soft_ds/inference/command.py.")
    p.add_argument("--model", required=True, help="exported Hugging Face checkpoint directory (`soft-ds export`)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one instruction (formatted with the training template unless --raw)")
    source.add_argument("--instructions", help="JSON list of Alpaca-style records: instruction, optional input")
    p.add_argument("--raw", action="store_true",
                   help="use --prompt as the literal prompt text (after the tokenizer's own bos, if it adds one)")
    p.add_argument("--template", choices=TEMPLATES,
                   help="prompt template (default: the one training recorded in the export, else alpaca)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--exit", type=int, help="generate with the N-layer sub-model (default: all layers)")
    mode.add_argument("--speculative-exit", type=int,
                      help="self-speculative decoding: draft with exit N, verify with the full model")
    mode.add_argument("--dynamic-threshold", type=float,
                      help="dynamic exit: each token stops at the first exit whose confidence exceeds this")
    mode.add_argument("--target-agreement", type=float,
                      help="dynamic exit with per-exit thresholds calibrated on held-out prompts so that this share "
                           "of tokens, in [0, 1], agree with the full model's greedy token (greedy only)")
    p.add_argument("--draft-tokens", type=int, default=4, help="tokens drafted per round (--speculative-exit)")
    p.add_argument("--draft-vocab", type=int,
                   help="draft with a head over only the N most frequent response tokens of --draft-vocab-data "
                        "(cheaper drafts; the full model still verifies, so greedy output is unchanged)")
    p.add_argument("--draft-vocab-data", default=BUNDLED_RECORDS,
                   help="Alpaca file whose responses --draft-vocab counts tokens in (default: the bundled sample)")
    p.add_argument("--draft-stop", type=float,
                   help="end a round's drafting when the draft's top probability falls below this for every "
                        "sequence (Kangaroo)")
    p.add_argument("--adaptive-k", action="store_true",
                   help="--draft-tokens is the first round's k; then +2 after a fully accepted round, else -1")
    p.add_argument("--confidence", choices=CONFIDENCE_MEASURES, default="max_prob",
                   help="confidence measure for --dynamic-threshold / --target-agreement")
    p.add_argument("--exits", help="comma-separated exits --dynamic-threshold / --target-agreement may stop at "
                                                    "(default: the training default for the model's depth)")
    p.add_argument("--calibration-prompts", type=int, default=32,
                   help="held-out instructions --target-agreement calibrates on (generated with --max-new-tokens)")
    p.add_argument("--calibration-instructions",
                   help="JSON records to calibrate on (default: PandaLM's test records 85 on, which the benchmark "
                        "does not measure); they must not include the prompts being answered")
    p.add_argument("--calibration-level", type=float, default=0.95,
                   help="confidence level of the lower bound on each exit's agreement (0.5: the raw rate)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens generated per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights and activations")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokenizer", help="tokenizer directory or tokenizer.model (default: the checkpoint's)")
    p.add_argument("--output", help="also write the records with their 'output' to this JSON file")
    p.add_argument("--stats", action="store_true", help="print speed and acceptance / exit depth to stderr")
    return p


def main(argv=None) -> list[str]:
    """`soft-ds generate`: print (and with --output write) the answers; return their texts."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sampling = check_options(parser, args)
    records = [{"instruction": args.prompt}] if args.prompt is not None else load_instructions(args.instructions)
    template = checkpoint_template(args.model, args.template)
    config = load_llama_config(args.model)
    exits = check_model_options(args, config)

    generator = SoftGenerator.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=args.device, exits=exits)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else generator.tokenizer
    if tokenizer is None:
        raise CheckpointError(f"{args.model} holds no tokenizer; pass --tokenizer")
    if args.raw:
        prompts = [encode_text(args.prompt, tokenizer)]
    else:
        prompts = [encode_prompt(record, tokenizer, template) for record in records]
    generator.check_prompts(prompts, args.max_new_tokens)  # every prompt, before the first batch runs
    dynamic = args.dynamic_threshold
    if args.target_agreement is not None:
        dynamic = calibrated_thresholds(args, generator, tokenizer, template, records)
    draft_vocabulary = None
    if args.draft_vocab is not None:
        counts = response_token_counts(args.draft_vocab_data, tokenizer, config.vocab_size, template)
        draft_vocabulary = frequent_tokens(counts, args.draft_vocab)

    common = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, eos_token_id=tokenizer.eos_token_id)
    texts, results, start = [], [], time.perf_counter()
    for first in range(0, len(prompts), args.batch_size):
        batch = prompts[first:first + args.batch_size]
        if args.speculative_exit is not None:
            result = generator.generate_speculative(batch, args.speculative_exit, args.draft_tokens, **common,
                                                    draft_vocabulary=draft_vocabulary, draft_stop=args.draft_stop,
                                                    adaptive=args.adaptive_k)
        elif dynamic is not None:
            result = generator.generate_dynamic(batch, dynamic, args.confidence, **common)
        else:
            result = generator.generate(batch, args.exit, **common)
        results.append(result)
        texts += [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in result.tokens]
    seconds = time.perf_counter() - start

    for index, (record, text) in enumerate(zip(records, texts)):
        if len(records) > 1:
            print(f"--- [{index}] {record['instruction'][:70]}")
        print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump([{**record, "output": text} for record, text in zip(records, texts)], f, indent=2,
                      ensure_ascii=False)
    if args.stats:
        print(stats_line(args, generator, prompts, results, seconds, dynamic is not None), file=sys.stderr)
    return texts


def check_options(parser: argparse.ArgumentParser, args) -> Sampling:
    """The options' own checks, before anything is loaded: the library's checks under the options'
    names (the library checks again when it runs). Returns the sampling they give."""
    if args.raw and args.prompt is None:
        parser.error("--raw applies to --prompt only")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty")
    for value, name in ((args.max_new_tokens, "--max-new-tokens"), (args.batch_size, "--batch-size"),
                        (args.draft_tokens, "--draft-tokens")):
        check_positive_integer(value, name)
    if args.dynamic_threshold is not None:
        check_threshold(args.dynamic_threshold, "--dynamic-threshold")
    check_positive_integer(args.calibration_prompts, "--calibration-prompts")
    check_confidence_level(args.calibration_level, "--calibration-level")
    if args.target_agreement is not None:
        check_target_agreement(args.target_agreement, "--target-agreement")
        if args.temperature > 0:
            raise ValueError("--target-agreement calibrates greedy decoding; it cannot be used with --temperature > 0")
    drafting = [name for name, value in (("--draft-vocab", args.draft_vocab), ("--draft-stop", args.draft_stop),
                                         ("--adaptive-k", args.adaptive_k or None)) if value is not None]
    if drafting and args.speculative_exit is None:
        parser.error(f"{', '.join(drafting)}: only with --speculative-exit")
    if args.draft_stop is not None:
        check_threshold(args.draft_stop, "--draft-stop")
    return Sampling(check_temperature(args.temperature, "--temperature"), check_top_p(args.top_p, "--top-p"),
                    args.seed)


def check_model_options(args, config) -> list[int] | None:
    """The options checked against the model's config.json, before its weights are loaded; returns
    the --exits given (None: the generator's default)."""
    num_layers = config.num_hidden_layers
    if args.exit is not None:
        check_exit_layer(args.exit, num_layers, "--exit")
    if args.speculative_exit is not None:
        check_draft_exit(args.speculative_exit, num_layers, "--speculative-exit")
    if args.draft_vocab is not None:
        check_draft_vocabulary_size(args.draft_vocab, config.vocab_size, "--draft-vocab")
    return None if args.exits is None else check_exit_layers(parse_list(args.exits, "--exits"), num_layers)


def stats_line(args, generator: SoftGenerator, prompts: list[list[int]], results: list, seconds: float,
               dynamic: bool) -> str:
    """--stats: speed, and the draft acceptance (speculative) or the mean exit layer and the
    agreement with the full model (dynamic exit), over every batch's `results`."""
    tokens = sum(result.num_tokens for result in results)
    line = f"{tokens} tokens in {seconds:.2f} s ({tokens / seconds:.1f} tokens/s)"
    if args.speculative_exit is not None:
        drafted = sum(result.drafted for result in results)
        accepted = sum(result.accepted for result in results)
        line += f"; draft acceptance {accepted}/{drafted} = {accepted / max(drafted, 1):.3f}"
    if dynamic:
        layers = [layer for result in results for sequence in result.exit_layers for layer in sequence]
        line += f"; mean exit layer {sum(layers) / max(len(layers), 1):.2f} of {generator.num_layers}"
        agreeing = total = 0
        for first, result in zip(range(0, len(prompts), args.batch_size), results):
            counts = prefix_agreement(generator, prompts[first:first + args.batch_size], result)
            agreeing, total = agreeing + counts[0], total + counts[1]
        line += f"; agreement with the full model's greedy token after the same prefix {agreeing / max(total, 1):.3f}"
    return line


def calibrated_thresholds(args, generator: SoftGenerator, tokenizer, template: str, records: list[dict]) -> dict:
    """--target-agreement: per-exit thresholds calibrated on held-out instructions that are not among
    the `records` being answered; the calibration's summary goes to stderr."""
    if args.calibration_instructions:
        calibration = calibration_records(args.calibration_prompts, args.calibration_instructions, first=0)
    else:
        calibration = calibration_records(args.calibration_prompts)
    held = {(record["instruction"], record.get("input") or "") for record in calibration}
    shared = [index for index, record in enumerate(records) if (record["instruction"], record.get("input") or "") in held]
    if shared:
        raise ValueError(f"instruction record(s) {shared[:5]} are also calibration prompts: the agreement would not "
                         "be measured on held-out prompts (pass --calibration-instructions with other records)")
    prompts = [encode_prompt(record, tokenizer, template) for record in calibration]
    generator.check_prompts(prompts, args.max_new_tokens)
    result = calibrate(generator, prompts, args.target_agreement, args.confidence, generator.exits,
                       args.max_new_tokens, tokenizer.eos_token_id, args.calibration_level, args.batch_size)
    print(result.summary(), file=sys.stderr)
    return result.thresholds
