"""Builds the real 2-stage DeepSpeed pipeline of the debug model (launched by tests/test_costs.py)
and saves, per rank, how many parameters its stage holds, for SoFT and for SFT, untied and tied
(keys "soft", "sft", "soft_tied", "sft_tied")."""

import json
import os

import torch

import _worker
from soft_ds.exits import make_exits
from soft_ds.model import preset_config, random_weights

SEQ_LEN = 16


def main():
    args = _worker.start()
    from soft_ds.pipe import build_pipeline
    rank = torch.distributed.get_rank()
    result = {}
    for tied in (False, True):
        config = preset_config("debug", vocab_size=512, tie_word_embeddings=tied)
        for mode in ("soft", "sft"):
            exits = make_exits(None, config.num_hidden_layers, mode=mode)
            module = build_pipeline(config, exits, 2, SEQ_LEN, random_weights(config, 0))
            stage = module._topo.get_coord(module.global_rank).pipe
            count = sum(p.numel() for p in module.local_hf_parameters().values())
            result[mode + "_tied" * tied] = {"stage": stage, "parameters": count}
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
