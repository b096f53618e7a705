#!/usr/bin/env python
"""Generate text with an exported SoFT checkpoint: any exit, self-speculative, or dynamic exit.

    python tools/generate.py --model exported/full --prompt "Name three primary colors."
    python tools/generate.py --model exported/full --prompt "..." --exit 4
    python tools/generate.py --model exported/full --prompt "..." --speculative-exit 4 --draft-tokens 3
    python tools/generate.py --model exported/full --instructions data/pandalm_testset_inference_v1.json \\
        --dynamic-threshold 0.9 --output answers.json

A prompt is formatted with the training template (`data.encode_prompt`: [bos] + the Alpaca
prompt), as an instruction with --prompt or as Alpaca-style records ({"instruction", "input"})
with --instructions; --raw feeds the --prompt text as it is. Greedy unless --temperature > 0.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from soft_ds.data import DataError, encode_prompt, load_instructions, load_tokenizer  # noqa: E402
from soft_ds.hf_io import CheckpointError, load_llama_config  # noqa: E402
from soft_ds.exits import check_exit_layer, check_exit_layers  # noqa: E402
from soft_ds.inference import CONFIDENCE_MEASURES, DTYPES, Sampling, SoftGenerator  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="exported Hugging Face checkpoint directory (tools/export_hf.py)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one instruction (formatted with the training template unless --raw)")
    source.add_argument("--instructions", help="JSON list of Alpaca-style records: instruction, optional input")
    p.add_argument("--raw", action="store_true", help="use --prompt as the literal prompt text (bos + text)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--exit", type=int, help="generate with the N-layer sub-model (default: all layers)")
    mode.add_argument("--speculative-exit", type=int,
                      help="self-speculative decoding: draft with exit N, verify with the full model")
    mode.add_argument("--dynamic-threshold", type=float,
                      help="dynamic exit: each token stops at the first exit whose confidence exceeds this")
    p.add_argument("--draft-tokens", type=int, default=4, help="tokens drafted per round (--speculative-exit)")
    p.add_argument("--confidence", choices=CONFIDENCE_MEASURES, default="max_prob",
                   help="confidence measure for --dynamic-threshold")
    p.add_argument("--exits", help="comma-separated exits --dynamic-threshold may stop at "
                                   "(default: the training default for the model's depth)")
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


def check_args(parser, args) -> None:
    if args.prompt is not None and not args.prompt.strip():
        parser.error("--prompt is empty")
    if args.raw and args.prompt is None:
        parser.error("--raw applies to --prompt only")
    if args.draft_tokens <= 0:
        parser.error(f"--draft-tokens must be a positive integer, got {args.draft_tokens}")
    if args.dynamic_threshold is not None and not 0 <= args.dynamic_threshold <= 1:
        parser.error(f"--dynamic-threshold must be in [0, 1], got {args.dynamic_threshold}")
    if args.max_new_tokens <= 0:
        parser.error(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    if args.batch_size <= 0:
        parser.error(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")


def check_depths(parser, args, num_layers: int) -> list[int] | None:
    """Exit arguments against the model's depth; returns the --exits list (or None)."""
    try:
        if args.exit is not None:
            check_exit_layer(args.exit, num_layers, "--exit")
        if args.speculative_exit is not None:  # the draft must be shallower than the model
            check_exit_layer(args.speculative_exit, num_layers, "--speculative-exit", deepest=num_layers - 1)
    except ValueError as error:
        parser.error(str(error))
    if args.exits is None:
        return None
    try:
        exits = [int(part) for part in args.exits.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--exits must be comma-separated integers, got {args.exits!r}")
    try:
        return list(check_exit_layers(exits, num_layers))
    except ValueError as error:
        parser.error(f"--exits {args.exits!r}: {error}")


def main(argv=None) -> list[str]:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        if args.prompt is not None:
            records = [{"instruction": args.prompt}]
        else:
            records = load_instructions(args.instructions)
        config = load_llama_config(args.model)
    except (CheckpointError, DataError) as error:
        parser.error(str(error))
    exits = check_depths(parser, args, config.num_hidden_layers)
    try:
        generator = SoftGenerator.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=args.device,
                                                  exits=exits)
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else generator.tokenizer
    except (CheckpointError, DataError, ValueError) as error:  # ValueError: an unsupported LLaMA variant
        parser.error(str(error))
    if tokenizer is None:
        parser.error(f"{args.model} holds no tokenizer; pass --tokenizer")
    if args.raw:
        prompts = [[tokenizer.bos_token_id] + tokenizer.encode(args.prompt, add_special_tokens=False)]
    else:
        prompts = [encode_prompt(record, tokenizer) for record in records]
    too_big = [i for i, prompt in enumerate(prompts) if max(prompt) >= config.vocab_size]
    if too_big:
        parser.error(f"the tokenizer produces ids beyond the model's vocabulary ({config.vocab_size}) "
                     f"for prompt(s) {too_big[:5]}: tokenizer and model do not match")

    sampling = Sampling(args.temperature, args.top_p, args.seed)
    common = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, eos_token_id=tokenizer.eos_token_id)
    texts, results, start = [], [], time.perf_counter()
    for first in range(0, len(prompts), args.batch_size):
        batch = prompts[first:first + args.batch_size]
        if args.speculative_exit is not None:
            result = generator.generate_speculative(batch, args.speculative_exit, args.draft_tokens, **common)
        elif args.dynamic_threshold is not None:
            result = generator.generate_dynamic(batch, args.dynamic_threshold, args.confidence, **common)
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
        tokens = sum(result.num_tokens for result in results)
        line = f"{tokens} tokens in {seconds:.2f} s ({tokens / seconds:.1f} tokens/s)"
        if args.speculative_exit is not None:
            drafted = sum(result.drafted for result in results)
            accepted = sum(result.accepted for result in results)
            line += f"; draft acceptance {accepted}/{drafted} = {accepted / max(drafted, 1):.3f}"
        if args.dynamic_threshold is not None:
            layers = [layer for result in results for sequence in result.exit_layers for layer in sequence]
            line += f"; mean exit layer {sum(layers) / max(len(layers), 1):.2f} of {config.num_hidden_layers}"
        print(line, file=sys.stderr)
    return texts


if __name__ == "__main__":
    main()
