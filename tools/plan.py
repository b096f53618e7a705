#!/usr/bin/env python
"""Per-stage memory and FLOPs of a SoFT/SFT pipeline run, from the same partition training uses.

    python tools/plan.py --model 13B --pp 4 --dp 8 --micro-batch 4 --seq-len 512 --grad-accum 4 \
        --bf16 --zero 1 --activation-checkpointing
    python tools/plan.py --model /ckpt/llama-2-13b/config.json --exits 20,30,40 --pp 2

The memory and FLOPs model is written out in soft_ds/plan.py's docstring.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from soft_ds.plan import format_plan, load_model_config, plan  # noqa: E402


def layer_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers like 12,16,40, got {text!r}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Formulas: see the docstring of soft_ds/plan.py.")
    p.add_argument("--model", required=True,
                   help="7B, 13B or 70B (LLaMA 2 shapes), a test preset (debug, tiny), or a Hugging Face "
                        "config.json / checkpoint directory")
    p.add_argument("--exits", type=layer_list, default=None,
                   help="exit layers, comma-separated (default: exits.default_exit_layers for the depth)")
    p.add_argument("--mode", choices=("soft", "sft"), default="soft", help="sft: one exit, the last layer")
    p.add_argument("--pp", type=int, default=1, help="pipeline degree (stages)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel degree (ZeRO-1 shards over it)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch per GPU")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--bf16", dest="bf16", action="store_true", default=True,
                           help="bf16 weights/activations, fp32 master weights (default)")
    precision.add_argument("--fp32", dest="bf16", action="store_false", help="fp32 everything")
    p.add_argument("--zero", type=int, choices=(0, 1), default=0, help="ZeRO stage")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute each decoder layer in backward")
    p.add_argument("--exit-chunk-tokens", type=int, default=1024,
                   help="chunked exit loss: tokens per logits chunk (0: whole micro-batch); as training")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory per device, GiB")
    args = p.parse_args(argv)
    try:
        config = load_model_config(args.model)
        plans = plan(config, args.exits, mode=args.mode, pipeline_stages=args.pp, data_parallel=args.dp,
                     micro_batch=args.micro_batch, seq_len=args.seq_len, grad_accum=args.grad_accum,
                     bf16=args.bf16, zero_stage=args.zero, activation_checkpointing=args.activation_checkpointing,
                     exit_chunk_tokens=args.exit_chunk_tokens, gpu_gib=args.gpu_gib)
    except ValueError as error:  # CheckpointError, partition's and make_exits' errors
        p.exit(2, f"{p.prog}: error: {error}\n")
    print(f"{args.model}: {config.num_hidden_layers} layers, mode {args.mode}, pp {args.pp} x dp {args.dp}, "
          f"micro-batch {args.micro_batch} x {args.seq_len} tokens, grad_accum {args.grad_accum}, "
          f"{'bf16' if args.bf16 else 'fp32'}, ZeRO-{args.zero}, activation checkpointing "
          f"{'on' if args.activation_checkpointing else 'off'}")
    print(format_plan(plans, args.grad_accum))


if __name__ == "__main__":
    main()
