#!/usr/bin/env python
"""Export a soft-ds training checkpoint as a Hugging Face LlamaForCausalLM directory.

    python tools/export_hf.py --run runs/soft --out exported/full
    python tools/export_hf.py --run runs/soft --exit 4 --out exported/exit4

With --exit N the directory holds the standalone N-layer sub-model: layers[:N] -> the shared
final norm -> lm_head, whose logits equal exit N's. Both load with plain transformers
(AutoModelForCausalLM / AutoTokenizer); this package is not needed to use them.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from soft_ds.hf_io import CheckpointError, read_training_checkpoint, save_hf_checkpoint  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="the training --output_dir (holds checkpoints/ and tokenizer/)")
    p.add_argument("--out", required=True, help="directory to write (must not exist or be empty)")
    p.add_argument("--exit", type=int, default=None, help="export the N-layer sub-model of exit N")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    try:
        state, config, meta = read_training_checkpoint(args.run, args.step)
        exits = [layer for layer, _ in meta["exits"]]
        if args.exit is not None and args.exit not in exits:
            print(f"note: layer {args.exit} was not a training exit (exits: {exits})", file=sys.stderr)
        tokenizer_dir = os.path.join(args.run, "tokenizer")
        out = save_hf_checkpoint(state, config, args.out, tokenizer_dir=tokenizer_dir, exit_layer=args.exit,
                                 overwrite=args.overwrite)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    what = f"exit {args.exit} ({args.exit} layers)" if args.exit else f"full model ({config.num_hidden_layers} layers)"
    print(f"exported {what} from step {meta['step']} of {args.run} to {out}")


if __name__ == "__main__":
    main()
