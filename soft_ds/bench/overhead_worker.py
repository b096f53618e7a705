"""One rank of `soft-ds bench overhead` (overhead.py starts it by file path with the `deepspeed`
launcher, one rank per stage).

Builds one engine per variant (overhead.VARIANTS names them: mode / exit-loss candidate / rows
packed or padded / optional random-k) on the same pipeline. The rows are the bundled Alpaca
sample's records at the run's sequence length (bench/rows.py), packed or one per row. Per engine:
build, warm up and run one measured step under the profiler's memory events (peak live tensor bytes
on this rank). Then times the engines round by round, all in turn, the order reversed every other
round.
Writes rank{N}.json: memory per engine on this rank, the step times (each the slowest rank's
wall time of one `train_batch`, i.e. one optimizer step, and the ranks' CPU time in it) and each
row layout's real and counted tokens per step.
"""

import argparse
import gc
import json
import os
import time

import torch
import torch.distributed as torch_dist
from torch.profiler import ProfilerActivity, profile, record_function

from soft_ds.bench.overhead import deepspeed_config, parse_variant
from soft_ds.bench.rows import alpaca_shapes, counted_tokens, real_tokens, shaped_batches
from soft_ds.bench.proxy import proxy_config
from soft_ds.config import RunConfig, load_config
from soft_ds.exit_schedule import ExitSchedule
from soft_ds.exits import make_exits
from soft_ds.model import random_weights
from soft_ds.distributed import init_distributed
from soft_ds.pipe import build_engine, build_pipeline

SEED = 0
MEASURED = "measured_step"


def parse_args():
    p = argparse.ArgumentParser()
    for name in ("layers", "hidden", "intermediate", "heads", "vocab", "warmup", "repeats", "steps"):
        p.add_argument(f"--{name}", type=int, required=True)
    p.add_argument("--config", required=True, help="the run's config file, overrides applied (overhead.write_config)")
    p.add_argument("--out", required=True)
    p.add_argument("--row-tokenizer", required=True, help="bench.rows.row_tokenizer's name")
    p.add_argument("--variants", required=True, help="comma-separated variant names (overhead.parse_variant)")
    p.add_argument("--local_rank", type=int, default=0)
    return p.parse_args()


def make_batches(args, config: RunConfig,
                 packed: bool) -> list[tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]:
    """One step's micro-batches of Alpaca-shaped rows (packed or one record per row), in the
    engine's format; reused for every step (token values do not change the cost)."""
    seq_len = config.soft.seq_len
    shapes = alpaca_shapes(seq_len, tokenizer=args.row_tokenizer)
    batches = shaped_batches(shapes, seq_len, args.vocab, config.micro_batch_size, config.grad_accum, packed, seed=SEED)
    return [((ids, targets, positions), targets) for ids, targets, positions in batches]


def live_bytes_profile(prof) -> tuple[int, int, int]:
    """(live bytes when the measured step starts, peak during it, live bytes when it ends), counted
    from the first event of the profile: every CPU allocation (+) and free (-) in time order."""
    events = prof.profiler.kineto_results.events()
    step = [e for e in events if e.name() == MEASURED]
    assert len(step) == 1, f"expected one {MEASURED!r} range, found {len(step)}"
    start, end = step[0].start_ns(), step[0].end_ns()
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live, static, peak = 0, None, 0
    for t, nbytes in memory:
        if t >= start and static is None:
            static = peak = live
        if t > end:
            break
        live += nbytes
        if static is not None:
            peak = max(peak, live)
    assert static is not None, "no memory event inside the measured step"
    return static, peak, live


def compute_contention(rank: int, world: int) -> dict:
    """Seconds of a fixed matmul workload on this rank alone and with every rank at once: whether
    the ranks' CPUs really compute in parallel, as the pipeline's GPUs would."""
    a = torch.randn(384, 384)

    def work() -> float:
        start = time.perf_counter()
        for _ in range(100):
            a @ a
        return time.perf_counter() - start

    work()
    alone = 0.0
    for r in range(world):
        torch_dist.barrier()
        if r == rank:
            alone = work()
    torch_dist.barrier()
    together = work()
    return {"alone": alone, "together": together}


def machine_busy_seconds() -> float:
    """CPU seconds every process on this machine has spent busy since boot (Linux /proc/stat),
    counting time the hypervisor gave to others (steal); NaN where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except OSError:
        return float("nan")
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def load_mark() -> tuple[float, float, float]:
    torch_dist.barrier()
    return machine_busy_seconds(), time.process_time(), time.perf_counter()


def other_share(mark) -> float:
    """Share of the machine's CPU capacity that processes other than the ranks used since `mark`
    (a collective): another job on the machine makes the step times of that interval meaningless."""
    busy, own, wall = mark
    torch_dist.barrier()
    ranks_cpu = torch.tensor(time.process_time() - own, dtype=torch.float64)
    torch_dist.all_reduce(ranks_cpu)
    return (machine_busy_seconds() - busy - float(ranks_cpu)) / ((time.perf_counter() - wall) * os.cpu_count())


def main():
    args = parse_args()
    init_distributed("gloo")
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    config = load_config(args.config)  # the run's settings, overrides applied
    stages, seq_len = config.soft.pipeline_stages, config.soft.seq_len
    assert world == stages, f"one rank per stage: world {world} != stages {stages}"
    proxy = proxy_config(args.layers, args.hidden, args.intermediate, args.heads, args.vocab, seq_len)
    ds_config = deepspeed_config(config, proxy)
    variants = args.variants.split(",")
    batches = {layout: make_batches(args, config, layout == "packed") for layout in ("packed", "padded")}
    tokens = {layout: {"real": real_tokens([b[0] for b in rows]), "counted": counted_tokens([b[0] for b in rows])}
              for layout, rows in batches.items()}

    def build(variant):
        v = parse_variant(variant)
        exits = make_exits(None, proxy.num_hidden_layers, mode=v.mode)
        schedule = ExitSchedule("random-k", v.sample_k, 0, SEED) if v.sample_k else ExitSchedule()
        module = build_pipeline(proxy, exits, stages, seq_len, random_weights(proxy, SEED),
                                exit_loss=v.implementation, exit_chunk_tokens=config.soft.exit_chunk_tokens,
                                activation_checkpointing=config.soft.activation_checkpointing, exit_schedule=schedule)
        return build_engine(module, ds_config, direct_weight_gradient=v.direct)

    def step(engine, layout: str) -> tuple[float, float]:
        """(wall seconds of one optimizer step, the slowest rank's; CPU seconds, all ranks together).
        CPU time counts the work done, whoever else shares the machine; wall time is the goal's."""
        torch_dist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        engine.train_batch(iter(batches[layout]))
        seconds = torch.tensor([time.perf_counter() - start, time.process_time() - cpu], dtype=torch.float64)
        wall, cpu = seconds.clone(), seconds.clone()
        torch_dist.all_reduce(wall, op=torch_dist.ReduceOp.MAX)
        torch_dist.all_reduce(cpu)
        return float(wall[0]), float(cpu[1])

    def log(message):
        if rank == 0:
            print(f"[benchmark] {message}", flush=True)

    contention = compute_contention(rank, world)
    log(f"one rank computing alone vs all ranks at once: {contention['together'] / contention['alone']:.2f}x slower")
    engines, memory, stage = {}, {}, None
    for variant in variants:
        gc.collect()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            engine = build(variant)
            layout = parse_variant(variant).layout
            for _ in range(args.warmup):
                step(engine, layout)
            with record_function(MEASURED):
                step(engine, layout)
        static, peak, end = live_bytes_profile(prof)
        memory[variant] = {"static": static, "peak": peak, "drift": end - static}
        engines[variant], stage = engine, engine.stage_id
        log(f"{variant}: built; rank 0 peak {peak / 2**20:.1f} MiB")

    times = {v: [] for v in variants}
    cpu_times = {v: [] for v in variants}
    other_load = []  # per round: the share of the machine's CPU other processes took
    for round_ in range(args.repeats):
        mark = load_mark()
        # Every engine in turn, the order reversed every other round (A B C, C B A): drift in
        # machine speed falls on all alike.
        for variant in (variants if round_ % 2 == 0 else variants[::-1]):
            wall, cpu = zip(*(step(engines[variant], parse_variant(variant).layout) for _ in range(args.steps)))
            times[variant].append(list(wall))
            cpu_times[variant].append(list(cpu))
        other_load.append(other_share(mark))
        log(f"round {round_ + 1}/{args.repeats}: " + ", ".join(f"{v} {min(times[v][-1]):.3f}s" for v in variants)
            + f"; other processes {other_load[-1]:.0%} of the CPU")

    result = {"rank": rank, "stage": stage, "threads": torch.get_num_threads(), "variants": variants,
              "memory": memory, "contention": contention, "tokens": tokens,
              "times": times, "cpu_times": cpu_times, "other_load": other_load}
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
