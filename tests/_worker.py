"""What the one-off DeepSpeed workers under tests/ share (each is started by the `deepspeed`
launcher with --out DIR): their arguments, and the gloo process group the launcher's variables
describe."""

import argparse


def start() -> argparse.Namespace:
    """Parse --out (and the launcher's --local_rank), then join the process group."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    from soft_ds.distributed import init_distributed
    init_distributed("gloo")
    return args
