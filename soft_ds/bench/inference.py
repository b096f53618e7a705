"""Inference speed of a SoFT model, in one run on the same prompts: every exit, self-speculative
decoding per draft exit and k, dynamic exit per threshold; goals PASS/MISS; a PNG of speed vs exit.

    soft-ds bench inference --model exported/full       # a SoFT checkpoint (HF directory)
    soft-ds bench inference                             # random stand-ins (see below)

Prompts: the first --num-prompts PandaLM test instructions (data/pandalm_testset_inference_v1.json)
formatted with the training template (`data.templates.encode_prompt`). Every configuration
generates exactly --max-new-tokens tokens per prompt (the eos does not stop it), so all runs do the
same work; greedy decoding. Timing: configurations are interleaved batch by batch, and a
configuration's tokens/s is the median over --repeats rounds. On a CPU with one thread (the default) the clock is the
process's CPU time, so time spent waiting for a core shared with other jobs does not count;
else wall time.

Two models are measured:
  1. --model DIR, or without it a random "tiny"-preset model (the shape of the SoFT demo model).
     A random model's exits do not agree with its full model, so its acceptance and agreement
     numbers (and the speculative and dynamic goals) say nothing about a trained SoFT model.
  2. The cost proxy of LLaMA 2 13B (proxy.py): its depth (40 layers) and exits {12, 16, ..., 40},
     a smaller width, and the vocabulary chosen so that head FLOPs / decoder-layer FLOPs equals the
     13B's (0.512 at sequence length 512): exit speed vs FLOPs then has the 13B's proportions. Its weights are random with every residual branch
     (o_proj, down_proj) scaled by --proxy-damping, 0 by default: the branches still cost their
     full FLOPs, but every exit then predicts exactly what the full model predicts, so its
     speculative and dynamic rows show what the mechanics give at full agreement (a synthetic
     ceiling, not a quality claim). Prompt ids are taken modulo its vocabulary.

Goals (from the issue), checked on each model:
  exit n tokens/s / full tokens/s >= 0.9 x FLOP ratio, FLOP ratio = FLOPs/token(full) / FLOPs/token(exit n)
      at the run's mean context length (`partition.exit_flop_ratio`);
  self-speculative >= 1.3x plain full-model greedy and >= 1.3x transformers' best
      generate(assistant_early_exit=n) (when measured), every speculative row's output identical
      to full greedy, and the best row achieving >= 90% of its bound;
  dynamic exit >= 1.25x at >= 97% token agreement with full-model greedy (same token at the same
      position of the same prompt), fixed thresholds and calibrated rows alike.

Calibrated dynamic exit (--target-agreements, e.g. 0.97; the model only, not the proxy): per-exit
thresholds calibrated (inference/calibrate.py) on --calibration-prompts PandaLM records from 85 on,
disjoint from the measured prompts (so --num-prompts <= 85), then timed like the other rows; its
table gives both agreements: per position with full greedy (as above) and per token after the same
prefix (what calibration targets).

Cheaper drafts (--draft-vocab, --draft-stop, --adaptive-k; see inference/speculative.py) add rows
for the reduced-vocabulary draft head (the m most frequent response tokens of the bundled Alpaca
sample, counted with the model's tokenizer) and for adaptive draft length. transformers' own
self-speculative decoding, `generate(assistant_early_exit=n)` (LayerSkip's path: no shared cache,
batch 1), runs on the same weights and prompts, one prompt at a time, with k constant and no
confidence stop, beside transformers' plain greedy (--no-transformers skips it).

Bound of a speculative row: what its measured acceptance allows at the measured per-pass costs,
    tokens per round x cost(full step) / (k x cost(draft step) + cost(verify)),
tokens per round = tokens emitted after the prompt's / rounds, per sequence; k = mean tokens
drafted per round; cost(draft step) = layers[:n] + the draft head on one token; cost(verify) =
layers[:n] on the last draft + layers[n:] and the full head on k + 1 tokens (k rounded); costs are
medians of --repeats x 5 timed passes on the first prompt batch, at its prompt length. The bound
leaves out the bookkeeping between passes, which is what "achieved / bound" measures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig

from soft_ds.bench.proxy import LLAMA2_13B, LLAMA2_13B_SEQ_LEN, head_layer_ratio, proxy_config
from soft_ds.settings import ArgumentParser, parse_list
from soft_ds.data.records import BUNDLED_INSTRUCTIONS, BUNDLED_RECORDS, load_instructions
from soft_ds.data.targets import frequent_tokens, response_token_counts
from soft_ds.data.templates import encode_prompt
from soft_ds.data.tokenizer import BUNDLED_TOKENIZER, load_tokenizer
from soft_ds.eval.report import verdict
from soft_ds.exits import PAPER_EXITS_40, check_exit_layers, default_exit_layers
from soft_ds.inference import SoftGenerator
from soft_ds.inference.calibrate import (CALIBRATION_FIRST, calibrate, calibration_prompts, check_target_agreement,
                                         prefix_agreement)
from soft_ds.inference.core import CONFIDENCE_MEASURES, check_positive_integer
from soft_ds.inference.dynamic import check_threshold
from soft_ds.inference.speculative import ReducedHead, check_draft_vocabulary_size
from soft_ds.model import Llama, preset_config, random_weights
from soft_ds.partition import exit_flop_ratio

GOAL_EXIT_FRACTION, GOAL_SPECULATIVE, GOAL_DYNAMIC, GOAL_AGREEMENT = 0.9, 1.3, 1.25, 0.97
GOAL_OF_BOUND = 0.9  # a speculative row's speedup / the bound its acceptance and pass costs allow


def build_random(config: LlamaConfig, seed: int, damping: float = 1.0) -> Llama:
    model = Llama.from_weights(config, random_weights(config, seed))
    if damping != 1.0:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.mul_(damping)
                layer.mlp.down_proj.weight.mul_(damping)
    return model


def load_prompts(tokenizer, count: int) -> list[list[int]]:
    records = load_instructions(BUNDLED_INSTRUCTIONS)[:count]
    return [encode_prompt(record, tokenizer) for record in records]


# --------------------------------------------------------------------------------------------


def make_clock(kind: str, device: torch.device):
    """Seconds: the process's CPU time ("cpu": with one thread it is the work done, and time lost
    to other jobs on a shared machine does not count) or wall time ("wall", after a CUDA sync)."""
    if kind == "cpu":
        return time.process_time

    def wall() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
    return wall


def pass_costs(generator: SoftGenerator, batch, n: int, draft_head, ks, clock, repeats: int) -> dict:
    """Median seconds of one decoding pass over `batch` after its prompt: "full" (all layers + head
    on one token), "draft" (layers[:n] + draft_head, or exit n's head, on one token) and ("verify",
    k) for each k (layers[:n] on one token + layers[n:] and the full head on k + 1 tokens). Each pass
    is rolled back, so all start from the same cache."""
    L, device = generator.num_layers, generator.device
    cache, positions, _ = generator.prefill(batch, L, max(ks, default=0) + 2)
    start = cache.columns
    token = torch.zeros(len(batch), dtype=torch.long, device=device)

    def timed(step) -> float:
        times = []
        for _ in range(repeats):
            begin = clock()
            step()
            times.append(clock() - begin)
            cache.rollback(start)
        return statistics.median(times)

    def one_token(depth, head):
        x, rope = generator.embed_new(cache, token, positions)
        return head(generator.run(cache, x, 0, depth, rope)[:, -1])

    def verify(k):
        x, rope = generator.embed_new(cache, token, positions)
        hidden = [generator.run(cache, x, 0, n, rope)]
        spans = positions[:, None] + torch.arange(k + 1, device=device)  # (B, k + 1)
        for i in range(1, k + 1):  # the drafts' layer-n states, untimed
            cache.reserve(spans[:, i:i + 1], torch.ones_like(spans[:, i:i + 1], dtype=torch.bool))
            hidden.append(hidden[0])
        begin = clock()
        x, rope = generator.embed_new(cache, token, positions + k + 1)
        generator.run(cache, x, 0, n, rope)
        generator.head(generator.run(cache, torch.cat(hidden, dim=1), n, L, generator.rope(spans)))
        return clock() - begin

    with torch.inference_mode():
        costs = {"full": timed(lambda: one_token(L, generator.head)),
                 "draft": timed(lambda: one_token(n, draft_head or (lambda h: generator.head(h, n))))}
        for k in ks:
            times = []
            for _ in range(repeats):
                times.append(verify(k))
                cache.rollback(start)
            costs[("verify", k)] = statistics.median(times)
    return costs


def transformers_rows(generator: SoftGenerator, prompts, args, draft_exits, full_tokens, clock) -> list[dict]:
    """transformers' plain greedy and `generate(assistant_early_exit=n)` on the same weights and
    prompts, one prompt at a time (its early-exit path is batch 1), median of --repeats rounds."""
    import transformers
    model = transformers.LlamaForCausalLM(generator.config).to(generator.device, generator.model.lm_head.weight.dtype)
    model.load_state_dict(generator.model.state_dict(), strict=True)
    model.eval()
    configs = {("transformers", None, None): {}}
    for n in draft_exits:
        for k in args.draft_tokens:
            configs[("transformers", n, k)] = dict(assistant_early_exit=n, num_assistant_tokens=k,
                                                   num_assistant_tokens_schedule="constant",
                                                   assistant_confidence_threshold=0.0)
    seconds = {key: [0.0] * args.repeats for key in configs}
    outputs = {key: [] for key in configs}
    began = time.time()
    with torch.inference_mode():
        for round_index in range(args.repeats):
            progress(f"transformers round {round_index + 1}/{args.repeats}", began)
            for key, options in configs.items():
                tokens = []
                for prompt in prompts:
                    ids = torch.tensor([prompt], device=generator.device)
                    start = clock()
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                         eos_token_id=None, pad_token_id=0, **options)
                    seconds[key][round_index] += clock() - start
                    tokens.append(out[0, len(prompt):].tolist())
                outputs[key] = tokens
    num_tokens = sum(map(len, full_tokens))
    rows = []
    for key in configs:
        pairs = [(a, b) for ours, full in zip(outputs[key], full_tokens) for a, b in zip(ours, full)]
        rows.append(dict(exit=key[1], k=key[2], tokens_per_s=num_tokens / statistics.median(seconds[key]),
                         identical=sum(a == b for a, b in pairs) / len(pairs)))
    return rows


def progress(message: str, since: float) -> None:
    """One line of progress on stderr (the report stays on stdout), with the wall time since `since`."""
    print(f"   ... {message} ({(time.time() - since) / 60:.1f} min)", file=sys.stderr, flush=True)


def configurations(generator: SoftGenerator, args, exits, draft_exits, calibrations, vocabulary) -> tuple[dict, list]:
    """({key: batch -> result} of every configuration, the speculative variants). A speculative
    variant: (draft exit, k, draft vocabulary size or None, draft stop or None, adaptive)."""
    common = dict(max_new_tokens=args.max_new_tokens)
    configs = {}
    for n in exits:
        configs[("exit", n)] = lambda batch, n=n: generator.generate(batch, exit_layer=n, **common)
    heads = [None] + list(args.draft_vocab)
    modes = [(None, False)] + [(stop, False) for stop in args.draft_stop] + ([(None, True)] if args.adaptive_k else [])
    variants = [(n, k, m, stop, adaptive) for n in draft_exits for k in args.draft_tokens for m in heads
                for stop, adaptive in modes]
    for variant in variants:
        n, k, m, stop, adaptive = variant
        configs[("speculative", *variant)] = lambda batch, n=n, k=k, m=m, stop=stop, adaptive=adaptive: (
            generator.generate_speculative(batch, n, k, draft_vocabulary=None if m is None else vocabulary[:m],
                                           draft_stop=stop, adaptive=adaptive, **common))
    for threshold in args.thresholds:
        configs[("dynamic", threshold)] = lambda batch, t=threshold: generator.generate_dynamic(
            batch, t, args.confidence, exits=exits, **common)
    for calibration in calibrations:
        configs[("calibrated", calibration.target)] = lambda batch, c=calibration: generator.generate_dynamic(
            batch, c.thresholds, c.measure, **common)
    return configs, variants


def time_interleaved(configs: dict, batches, repeats: int, clock) -> tuple[dict, dict]:
    """({key: seconds per round}, {key: result per prompt batch}): every configuration on every
    batch, interleaved batch by batch in alternating order, so that a slow spell of the machine
    falls on all of them alike."""
    seconds = {key: [0.0] * repeats for key in configs}
    outputs = {key: [None] * len(batches) for key in configs}
    began = time.time()
    for round_index in range(repeats):
        for batch_index, batch in enumerate(batches):
            keys = list(configs)
            for key in keys if (round_index + batch_index) % 2 == 0 else reversed(keys):
                start = clock()
                outputs[key][batch_index] = configs[key](batch)
                seconds[key][round_index] += clock() - start
            progress(f"round {round_index + 1}/{repeats}, prompt batch {batch_index + 1}/{len(batches)}: "
                     f"{len(configs)} configurations timed", began)
    return seconds, outputs


class Timings:
    """Each configuration's results and speed (tokens/s: the full model's token count over the
    median round), and what the rows compare against the full model's greedy output."""

    def __init__(self, seconds: dict, outputs: dict, full_key):
        self.outputs = outputs
        self.full_tokens = self.tokens_of(full_key)
        self.num_tokens = sum(map(len, self.full_tokens))
        self.speed = {key: self.num_tokens / statistics.median(times) for key, times in seconds.items()}
        self.full_speed = self.speed[full_key]

    def tokens_of(self, key) -> list[list[int]]:
        return [tokens for result in self.outputs[key] for tokens in result.tokens]

    def agreement(self, key) -> float:
        """Share of positions where the configuration's token is the full model's greedy one."""
        pairs = [(a, b) for ours, full in zip(self.tokens_of(key), self.full_tokens) for a, b in zip(ours, full)]
        return sum(a == b for a, b in pairs) / len(pairs)

    def exit_layers(self, key) -> list[int]:
        """The exit each token of a dynamic configuration left at."""
        return [layer for result in self.outputs[key] for sequence in result.exit_layers for layer in sequence]

    def dynamic_row(self, key) -> dict:
        depths = self.exit_layers(key)
        return dict(tokens_per_s=self.speed[key], speedup=self.speed[key] / self.full_speed,
                    mean_exit=sum(depths) / len(depths), agreement=self.agreement(key))


def speculative_rows(generator: SoftGenerator, timings: Timings, variants, batches, num_prompts: int,
                     vocabulary, clock, repeats: int) -> list[dict]:
    """One row per speculative variant: speed, acceptance, draft length, and the bound its
    acceptance allows at the pass costs measured on the first batch (`pass_costs`, `repeats` each)."""
    rows, costs = [], {}
    for variant in variants:
        n, k, m, stop, adaptive = variant
        key = ("speculative", *variant)
        results = timings.outputs[key]
        drafted = sum(result.drafted for result in results)
        accepted = sum(result.accepted for result in results)
        lengths = [length for result in results for length in result.draft_lengths]
        mean_k = statistics.mean(lengths) if lengths else 0.0
        # Tokens per round and sequence, after the prompt's own token (plain greedy makes it too).
        sequence_rounds = sum(result.steps * len(result.tokens) for result in results)
        emitted = (timings.num_tokens - num_prompts) / max(sequence_rounds, 1)
        verify_k = round(mean_k)
        if (n, m) not in costs:
            head = None if m is None else ReducedHead(generator.model, vocabulary[:m], n)
            costs[(n, m)] = pass_costs(generator, batches[0], n, head, [], clock, repeats)
        if (n, "verify", verify_k) not in costs:
            costs[(n, "verify", verify_k)] = pass_costs(generator, batches[0], n, None, [verify_k], clock,
                                                        repeats)[("verify", verify_k)]
        cost = {**costs[(n, m)], ("verify", verify_k): costs[(n, "verify", verify_k)]}
        bound = emitted * cost["full"] / (mean_k * cost["draft"] + cost[("verify", verify_k)])
        speed = timings.speed[key]
        speedup = speed / timings.full_speed
        rows.append(dict(exit=n, k=k, head="full" if m is None else str(m),
                         mode="fixed" if stop is None and not adaptive else
                         (f"stop {stop:g}" if stop is not None else "adaptive"),
                         tokens_per_s=speed, speedup=speedup, acceptance=accepted / max(drafted, 1), mean_k=mean_k,
                         tokens_per_round=emitted, bound=bound, of_bound=speedup / bound,
                         draft_cost=cost["draft"] / cost["full"], identical=timings.agreement(key)))
    return rows


def run_suite(generator: SoftGenerator, prompts, args, exits, draft_exits, calibrations=(), vocabulary=None) -> dict:
    """Time every configuration; return the rows for the report. calibrations: calibrate.Calibration
    rules for dynamic exit; vocabulary: token ids, most frequent first, whose first m form the draft
    head of --draft-vocab m.

    Configurations are interleaved prompt batch by prompt batch (`time_interleaved`); a
    configuration's time is the median over rounds of its summed batch times."""
    L = generator.num_layers
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    clock = make_clock(args.clock, generator.model.lm_head.weight.device)
    configs, variants = configurations(generator, args, exits, draft_exits, calibrations, vocabulary)
    for batch in batches[:2]:  # warm-up
        generator.generate(batch, max_new_tokens=2)
    timings = Timings(*time_interleaved(configs, batches, args.repeats, clock), full_key=("exit", L))
    context = statistics.mean(len(prompt) for prompt in prompts) + args.max_new_tokens / 2

    rows = {"exits": [], "speculative": [], "dynamic": [], "calibrated": []}
    for n in exits:
        rows["exits"].append(dict(exit=n, tokens_per_s=timings.speed[("exit", n)],
                                  speed_ratio=timings.speed[("exit", n)] / timings.full_speed,
                                  flop_ratio=exit_flop_ratio(generator.config, n, context),
                                  agreement=timings.agreement(("exit", n))))
    rows["speculative"] = speculative_rows(generator, timings, variants, batches, len(prompts), vocabulary, clock,
                                           5 * args.repeats)
    rows["transformers"] = []
    if getattr(args, "transformers", False):
        rows["transformers"] = transformers_rows(generator, prompts, args, draft_exits, timings.full_tokens, clock)
        for row in rows["transformers"]:
            row["speedup"] = row["tokens_per_s"] / timings.full_speed
    for threshold in args.thresholds:
        rows["dynamic"].append(dict(threshold=threshold, **timings.dynamic_row(("dynamic", threshold))))
    for calibration in calibrations:
        key = ("calibrated", calibration.target)
        agreeing = sum(prefix_agreement(generator, batch, result)[0]
                       for batch, result in zip(batches, timings.outputs[key]))
        rows["calibrated"].append(dict(calibration=calibration, **timings.dynamic_row(key),
                                       prefix_agreement=agreeing / len(timings.exit_layers(key))))
    rows["context"], rows["num_tokens"], rows["layers"] = context, timings.num_tokens, L
    return rows


def report(title: str, rows: dict, note: str) -> list[str]:
    """Print the three tables and the goal lines; return the goal lines."""
    L = rows["layers"]
    print(f"\n== {title}")
    print(f"   {note}")
    print(f"   mean context {rows['context']:.0f} tokens; {rows['num_tokens']} tokens generated per configuration")
    print("\n   exit  tokens/s  speed/full  FLOP ratio  goal (>= 0.9 x FLOP)  agreement with full")
    for row in rows["exits"]:
        goal = "" if row["exit"] == L else verdict(row["speed_ratio"] >= GOAL_EXIT_FRACTION * row["flop_ratio"])
        name = f"{row['exit']}" + (" (full)" if row["exit"] == L else "")
        print(f"   {name:>9} {row['tokens_per_s']:8.1f}  {row['speed_ratio']:10.2f}  {row['flop_ratio']:10.2f}  "
              f"{goal:>20}  {row['agreement']:7.1%}")
    print("\n   self-speculative (greedy): draft exit, k drafted per round (first round's k when adaptive), draft head")
    print("   (full or the m most frequent tokens), mode (fixed k, stop below a draft confidence, adaptive k);")
    print("   draft cost = draft step / full step; bound = tokens/round x full / (k x draft + verify), measured passes;")
    print("   identical = tokens equal to full greedy")
    print("   draft  k   head  mode       tokens/s  speedup  bound  of bound  acceptance  mean k  tokens/round  "
          "draft cost  identical")
    for row in rows["speculative"]:
        print(f"   {row['exit']:5d} {row['k']:2d} {row['head']:>6}  {row['mode']:<9} {row['tokens_per_s']:8.1f}  "
              f"{row['speedup']:6.2f}x {row['bound']:5.2f}x  {row['of_bound']:8.0%}  {row['acceptance']:10.1%}  "
              f"{row['mean_k']:6.2f}  {row['tokens_per_round']:12.2f}  {row['draft_cost']:10.2f}  "
              f"{row['identical']:8.1%}")
    if rows.get("transformers"):
        print("\n   transformers on the same weights, one prompt at a time: greedy, and generate(assistant_early_exit=n)")
        print("   with k constant; speedup vs soft-ds full greedy at this run's batch size")
        print("   draft  k  tokens/s  speedup  identical")
        for row in rows["transformers"]:
            name = "greedy" if row["exit"] is None else f"{row['exit']:5d} {row['k']:2d}"
            print(f"   {name:>8}  {row['tokens_per_s']:8.1f}  {row['speedup']:6.2f}x  {row['identical']:8.1%}")
    print("\n   dynamic exit: threshold on the exit's confidence; agreement = same token as full greedy")
    print("   threshold  tokens/s  speedup  mean exit  agreement")
    for row in rows["dynamic"]:
        print(f"   {row['threshold']:9.2f}  {row['tokens_per_s']:8.1f}  {row['speedup']:6.2f}x  "
              f"{row['mean_exit']:6.2f}/{L}  {row['agreement']:8.1%}")
    if rows["calibrated"]:
        print("\n   calibrated dynamic exit: per-exit thresholds for a target agreement, calibrated on held-out prompts")
        print("   target  tokens/s  speedup  mean exit  agreement  after same prefix  thresholds")
        for row in rows["calibrated"]:
            rule = ",".join(f"{layer}:{value:.3g}" for layer, value in row["calibration"].thresholds.items())
            print(f"   {row['calibration'].target:6.3f}  {row['tokens_per_s']:8.1f}  {row['speedup']:6.2f}x  "
                  f"{row['mean_exit']:6.2f}/{L}  {row['agreement']:8.1%}  {row['prefix_agreement']:17.1%}  {rule}")

    exit_rows = [row for row in rows["exits"] if row["exit"] != L]
    exit_pass = [row for row in exit_rows if row["speed_ratio"] >= GOAL_EXIT_FRACTION * row["flop_ratio"]]
    goals = [f"exit throughput >= 0.9 x FLOP ratio: {verdict(len(exit_pass) == len(exit_rows))} "
             f"({len(exit_pass)}/{len(exit_rows)} exits)"]
    goals.append(speculative_goal(rows))
    dynamic = rows["dynamic"] + [{**row, "threshold": f"calibrated {row['calibration'].target}"}
                                 for row in rows["calibrated"]]
    faithful = [row for row in dynamic if row["agreement"] >= GOAL_AGREEMENT]
    if faithful:
        best = max(faithful, key=lambda row: row["speedup"])
        goals.append(f"dynamic exit >= {GOAL_DYNAMIC}x at >= {GOAL_AGREEMENT:.0%} agreement: "
                     f"{verdict(best['speedup'] >= GOAL_DYNAMIC)} (best {best['speedup']:.2f}x at threshold "
                     f"{best['threshold']}, agreement {best['agreement']:.1%}, mean exit {best['mean_exit']:.2f})")
    else:
        goals.append(f"dynamic exit >= {GOAL_DYNAMIC}x at >= {GOAL_AGREEMENT:.0%} agreement: MISS "
                     "(no threshold reaches the agreement)")
    print("\n   goals:")
    for line in goals:
        print(f"   - {line}")
    return goals


def speculative_goal(rows: dict) -> str:
    """The self-speculative goal line: the fastest speculative row against plain greedy, against
    transformers' fastest assistant_early_exit row (when measured) and against its own bound; every
    speculative row's output must equal full greedy."""
    speculative = rows["speculative"]
    if not speculative:
        return "self-speculative: N/A (no draft exit measured)"
    best = max(speculative, key=lambda row: row["speedup"])
    theirs = [row for row in rows.get("transformers") or [] if row["exit"] is not None]
    exact = all(row["identical"] == 1.0 for row in speculative)
    checks = [best["speedup"] >= GOAL_SPECULATIVE, best["of_bound"] >= GOAL_OF_BOUND, exact]
    against = ""
    if theirs:
        fastest = max(theirs, key=lambda row: row["speedup"])
        ratio = best["speedup"] / fastest["speedup"]
        checks.append(ratio >= GOAL_SPECULATIVE)
        against = (f", {ratio:.2f}x transformers' best assistant_early_exit ({fastest['speedup']:.2f}x at exit "
                   f"{fastest['exit']}, k={fastest['k']})")
    return (f"self-speculative >= {GOAL_SPECULATIVE}x greedy and transformers, >= {GOAL_OF_BOUND:.0%} of its bound, "
            f"identical output: {verdict(all(checks))} (best {best['speedup']:.2f}x at exit {best['exit']}, "
            f"k={best['k']}, head {best['head']}, {best['mode']}: acceptance {best['acceptance']:.1%}, "
            f"{best['of_bound']:.0%} of bound {best['bound']:.2f}x{against}; identical to full greedy: "
            + ("every row" if exact else ", ".join(f"exit {row['exit']} k={row['k']}: {row['identical']:.1%}"
                                                    for row in speculative if row["identical"] != 1.0)) + ")")


def plot(path: Path, curves) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot written"
    fig, (absolute, relative) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, rows in curves:
        exits = [row["exit"] for row in rows["exits"]]
        L = rows["layers"]
        absolute.plot(exits, [row["tokens_per_s"] for row in rows["exits"]], "o-", label=label)
        fraction = [n / L for n in exits]
        line, = relative.plot(fraction, [row["speed_ratio"] for row in rows["exits"]], "o-", label=f"{label}: measured")
        relative.plot(fraction, [row["flop_ratio"] for row in rows["exits"]], "--", color=line.get_color(),
                      label=f"{label}: FLOP ratio")
    absolute.set(xlabel="exit layer", ylabel="tokens/s", title="decoding speed per exit")
    relative.set(xlabel="exit depth / model depth", ylabel="speed / full model", title="speed-up vs FLOP ratio")
    for axis in (absolute, relative):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return f"plot written to {path}"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="exported SoFT checkpoint (HF directory); default: a random tiny model")
    p.add_argument("--num-prompts", type=int, default=8, help="PandaLM instructions used (of 170)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("--batch-size", type=int, default=1, help="prompts decoded together")
    p.add_argument("--repeats", type=int, default=2, help="timing rounds; the median is reported")
    p.add_argument("--exits", help="comma-separated exits (default: the training default for the depth)")
    p.add_argument("--draft-exits", help="comma-separated draft exits for self-speculative rows (default: every "
                                         "measured exit below the last)")
    p.add_argument("--draft-tokens", default="2,4,6", help="k values for self-speculative decoding")
    p.add_argument("--draft-vocab", default="",
                   help="comma-separated sizes m: also draft with a head over the m most frequent response tokens")
    p.add_argument("--draft-stop", default="",
                   help="comma-separated draft-confidence stops: also draft until the top probability is below each")
    p.add_argument("--adaptive-k", action="store_true", help="also draft with k adapted from acceptance (+2/-1)")
    p.add_argument("--no-transformers", dest="transformers", action="store_false",
                   help="skip transformers' generate(assistant_early_exit=n) rows")
    p.add_argument("--thresholds", default="0,0.2,0.4,0.6,0.8,0.9,0.95,1", help="dynamic-exit thresholds")
    p.add_argument("--confidence", default="max_prob", choices=CONFIDENCE_MEASURES)
    p.add_argument("--target-agreements", default="",
                   help="comma-separated target agreements for calibrated dynamic exit (e.g. 0.97; default: none)")
    p.add_argument("--calibration-prompts", type=int, default=16,
                   help="PandaLM records (from 85 on) the thresholds are calibrated on")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    p.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                   help="auto: process CPU time on a CPU with one thread, else wall time")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of the random models")
    p.add_argument("--no-proxy", action="store_true", help="skip the LLaMA 2 13B cost proxy")
    p.add_argument("--proxy-layers", type=int, default=40)
    p.add_argument("--proxy-hidden", type=int, default=256)
    p.add_argument("--proxy-intermediate", type=int, default=688, help="13B: 2.7 x hidden")
    p.add_argument("--proxy-heads", type=int, default=2, help="head dim 128 as in the 13B; no GQA, as in the 13B")
    p.add_argument("--proxy-draft-exits", default="12,16,20", help="draft exits measured on the proxy")
    p.add_argument("--proxy-thresholds", default="0,0.5,1",
                   help="dynamic-exit thresholds on the proxy (its random head is never confident, so any "
                        "threshold in (0, 1) behaves alike: every exit checked, none taken)")
    p.add_argument("--proxy-damping", type=float, default=0.0,
                   help="scale of the proxy's residual branches (0: every exit predicts exactly what the "
                        "full model does)")
    p.add_argument("--plot", default="runs/benchmark_inference.png", help="PNG of speed vs exit")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The options, lists parsed and checked by the library's own checks under the options' names,
    before any model is built; --clock auto resolved."""
    args = build_parser().parse_args(argv)
    for name in ("num_prompts", "max_new_tokens", "batch_size", "repeats", "threads", "calibration_prompts"):
        check_positive_integer(getattr(args, name), f"--{name.replace('_', '-')}")
    args.draft_tokens = parse_list(args.draft_tokens, "--draft-tokens")
    args.draft_vocab = parse_list(args.draft_vocab, "--draft-vocab") if args.draft_vocab else []
    args.draft_stop = parse_list(args.draft_stop, "--draft-stop", float) if args.draft_stop else []
    for m in args.draft_vocab:
        check_positive_integer(m, "each of --draft-vocab")
    for stop in args.draft_stop:
        check_threshold(stop, "each of --draft-stop")
    args.thresholds = parse_list(args.thresholds, "--thresholds", float)
    args.proxy_thresholds = parse_list(args.proxy_thresholds, "--proxy-thresholds", float)
    args.target_agreements = parse_list(args.target_agreements, "--target-agreements", float)
    for target in args.target_agreements:
        check_target_agreement(target, "each of --target-agreements")
    if args.target_agreements and args.num_prompts > CALIBRATION_FIRST:
        raise ValueError(f"--num-prompts {args.num_prompts}: with --target-agreements at most {CALIBRATION_FIRST}, "
                         f"so that the measured PandaLM prompts stay apart from the calibration ones (records "
                         f"{CALIBRATION_FIRST} on)")
    for k in args.draft_tokens:
        check_positive_integer(k, "each of --draft-tokens")
    for name in ("thresholds", "proxy_thresholds"):
        for threshold in getattr(args, name):
            check_threshold(threshold, f"each of --{name.replace('_', '-')}")
    if args.clock == "auto":
        args.clock = "cpu" if args.device == "cpu" and args.threads == 1 else "wall"
    return args


def load_model(args) -> tuple[SoftGenerator, str, str]:
    """(the generator of --model or of a random tiny model, the report's title for it, its note)."""
    if args.model:
        return SoftGenerator.from_pretrained(args.model, device=args.device), f"model {args.model}", "SoFT checkpoint"
    generator = SoftGenerator(build_random(preset_config("tiny"), args.seed).to(args.device))
    note = ("RANDOM WEIGHTS: its exits do not agree with its full model, so acceptance, agreement and "
            "the speculative/dynamic goals below say nothing about a trained SoFT model")
    return generator, "random tiny model (no --model given)", note


def draft_vocabulary(args, tokenizer, config: LlamaConfig) -> torch.Tensor | None:
    """The bundled sample's response tokens, most frequent first, as many as the largest
    --draft-vocab (None without it); prints how much of the responses each size covers."""
    if not args.draft_vocab:
        return None
    for m in args.draft_vocab:
        check_draft_vocabulary_size(m, config.vocab_size, "each of --draft-vocab")
    counts = response_token_counts(BUNDLED_RECORDS, tokenizer, config.vocab_size)
    vocabulary = frequent_tokens(counts, max(args.draft_vocab))
    coverage = ", ".join(f"top {m}: {counts[vocabulary[:m]].sum() / counts.sum():.1%}" for m in args.draft_vocab)
    print(f"draft vocabularies: the most frequent response tokens of {os.path.basename(BUNDLED_RECORDS)} ({coverage} "
          "of its response tokens)")
    return vocabulary


def calibrate_targets(generator: SoftGenerator, tokenizer, args, exits) -> list:
    """One calibrate.Calibration per --target-agreements, on the held-out PandaLM records."""
    calibrations = []
    if args.target_agreements:
        held_out = calibration_prompts(tokenizer, args.calibration_prompts)
        generator.check_prompts(held_out, args.max_new_tokens)
        for target in args.target_agreements:
            calibrations.append(calibrate(generator, held_out, target, args.confidence, exits,
                                          args.max_new_tokens, None, batch_size=args.batch_size))
            print(f"   {calibrations[-1].summary()}")
    return calibrations


def measured_draft_exits(args, exits, L: int) -> list[int]:
    """--draft-exits, each one of the measured exits below the last; default: all of those."""
    below = [n for n in exits if n < L]
    if not args.draft_exits:
        return below
    draft_exits = parse_list(args.draft_exits, "--draft-exits")
    if not set(draft_exits) <= set(below):
        raise ValueError(f"--draft-exits {args.draft_exits}: each must be one of the measured exits below the "
                         f"last, {below} (--exits)")
    return draft_exits


def run_proxy(args, prompts) -> tuple[list[str], tuple[str, dict]]:
    """The LLaMA 2 13B cost proxy's suite (random weights, its prompts' ids taken modulo its
    vocabulary): (its goal lines, its plot curve)."""
    proxy = proxy_config(args.proxy_layers, args.proxy_hidden, args.proxy_intermediate, args.proxy_heads)
    proxy_exits = list(PAPER_EXITS_40) if proxy.num_hidden_layers == 40 else list(
        default_exit_layers(proxy.num_hidden_layers))
    proxy_generator = SoftGenerator(build_random(proxy, args.seed, args.proxy_damping).to(args.device),
                                    exits=proxy_exits)
    proxy_prompts = [[token % proxy.vocab_size for token in prompt] for prompt in prompts]
    draft_exits = [n for n in parse_list(args.proxy_draft_exits, "--proxy-draft-exits")
                   if n in proxy_exits and n < proxy.num_hidden_layers]
    proxy_args = argparse.Namespace(**{**vars(args), "thresholds": args.proxy_thresholds, "draft_vocab": [],
                                       "draft_stop": [], "adaptive_k": False, "transformers": False})
    proxy_rows = run_suite(proxy_generator, proxy_prompts, proxy_args, proxy_exits, draft_exits)
    shape = (f"{proxy.num_hidden_layers} layers, hidden {proxy.hidden_size}, intermediate "
             f"{proxy.intermediate_size}, {proxy.num_attention_heads} heads, vocab {proxy.vocab_size} "
             f"(chosen so head/layer FLOPs = {head_layer_ratio(proxy):.3f}; LLaMA 2 13B: "
             f"{head_layer_ratio(LLAMA2_13B):.3f})")
    goals = report(f"LLaMA 2 13B cost proxy: {shape}", proxy_rows,
                   f"random weights, residual branches x {args.proxy_damping}: "
                   + ("every exit predicts what the full model predicts, by construction; "
                      "its speculative/dynamic rows are a synthetic ceiling at full agreement"
                      if args.proxy_damping == 0 else "exits agree partly"))
    return goals, (f"13B proxy ({proxy.num_hidden_layers} layers)", proxy_rows)


def main(argv=None) -> dict[str, list[str]]:
    """`soft-ds bench inference`: print the tables and goal lines, write the plot; return the goal
    lines per model."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    generator, title, note = load_model(args)
    tokenizer = generator.tokenizer or load_tokenizer(BUNDLED_TOKENIZER)
    config = generator.config
    L = config.num_hidden_layers
    exits = parse_list(args.exits, "--exits") if args.exits else list(default_exit_layers(L))
    exits = list(check_exit_layers(exits + [L], L))  # the full model is always measured
    prompts = load_prompts(tokenizer, args.num_prompts)
    generator.check_prompts(prompts, args.max_new_tokens)
    vocabulary = draft_vocabulary(args, tokenizer, config)
    print(f"soft-ds inference benchmark: {len(prompts)} PandaLM prompts (training template), "
          f"{args.max_new_tokens} new tokens each, batch {args.batch_size}, greedy, "
          f"{next(generator.model.parameters()).dtype} on {args.device}, {args.threads} CPU thread(s), "
          f"{args.clock} clock, median of {args.repeats} interleaved rounds")
    shape = (f"{L} layers, hidden {config.hidden_size}, vocab {config.vocab_size}, "
             f"head/layer FLOPs {head_layer_ratio(config):.2f} at seq {LLAMA2_13B_SEQ_LEN}")
    calibrations = calibrate_targets(generator, tokenizer, args, exits)
    draft_exits = measured_draft_exits(args, exits, L)
    rows = run_suite(generator, prompts, args, exits, draft_exits, calibrations, vocabulary)
    goals = {"model": report(f"{title}: {shape}", rows, note)}
    curves = [(f"model ({L} layers)", rows)]
    if not args.no_proxy:
        goals["13B cost proxy"], curve = run_proxy(args, prompts)
        curves.append(curve)

    print("\n== summary")
    for name, lines in goals.items():
        for line in lines:
            print(f"   [{name}] {line}")
    print(f"   {plot(Path(args.plot), curves)}")
    return goals
