"""Calibrated dynamic exit: per-exit thresholds chosen on held-out prompts so that the tokens dynamic
exit emits agree with the full model's at a requested rate (CALM, Schuster et al. 2022), instead of
one global threshold a user must guess.

    calibration = calibrate(generator, calibration_prompts(tokenizer, 32), target=0.97)
    generator.generate_dynamic(prompts, calibration.thresholds)   # {exit layer: threshold}

Agreement is greedy and per token: an emitted token agrees when it is the full model's greedy token
after the same prefix (`prefix_agreement`). That is what a stopping rule decides token by token,
and what calibration can measure in one pass; it is not the share of positions equal to full greedy
decoding, where one early disagreement shifts every later token.

Calibration, in two steps:
  1. `exit_statistics`: the full model decodes the calibration prompts greedily; one teacher-forced
     pass over each prompt and its continuation then gives, at every generated position, every
     exit's confidence and whether its argmax is the full model's.
  2. `calibrate_thresholds`: exit by exit, shallow to deep, on the tokens no shallower exit stopped
     (a token stops at its FIRST confident exit), the lowest threshold whose stopped tokens agree
     at least at the target, by a lower confidence bound rather than the raw rate: the one-sided
     Wilson score bound at `confidence_level` (0.95 by default; 0.5 is the raw rate). Every exit's
     stopped tokens then meet the target and the full model's own tokens agree by definition, so
     the policy's agreement on the calibration tokens is >= the target, whatever share each exit
     takes; and it holds per exit, so it does not rest on how many tokens reach the deep exits.
     The bound is the margin that makes a small calibration set stop fewer tokens: stopping
     anything at target 0.97 takes a set of at least 88 tokens that all agree (n / (n + 1.645^2)).
     Why not CALM's distribution-free Learn-then-Test guarantee? It bounds the agreement of a
     one-parameter family of rules over whole sequences and needs a decoding run per candidate; a
     per-exit bound on one teacher-forced pass is cheap enough to run before every `soft-ds
     generate`, and the tests check that the target holds on held-out prompts.

Calibration prompts are held out from the prompts measured: PandaLM's test instructions
(data/pandalm_testset_inference_v1.json) from record CALIBRATION_FIRST on calibrate, and `soft-ds
bench inference` measures the records before it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from statistics import NormalDist

import torch

from soft_ds.data.records import BUNDLED_INSTRUCTIONS, load_instructions
from soft_ds.data.templates import encode_prompt
from soft_ds.inference.core import CachedModel, Generation, check_confidence_measure, check_positive_integer, confidence
from soft_ds.inference.dynamic import exit_thresholds
from soft_ds.inference.exit import generate_at_exit

# PandaLM's 170 records: 0..84 are measured (the benchmark's prompts), 85..169 calibrate.
CALIBRATION_FIRST = 85


def check_target_agreement(target: float, name: str = "target agreement") -> float:
    """A share in [0, 1]: 0 asks nothing (every token stops at the first exit), 1 asks for the full
    model's every token."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {target!r}")
    return float(target)


def check_confidence_level(level: float, name: str = "confidence level") -> float:
    if not 0.5 <= level < 1:
        raise ValueError(f"{name} must be in [0.5, 1) (0.5: the raw agreement rate, no margin), got {level}")
    return level


def calibration_records(count: int, path: str | os.PathLike = BUNDLED_INSTRUCTIONS,
                        first: int = CALIBRATION_FIRST) -> list[dict]:
    """The calibration instructions: `count` records of `path` from record `first` on."""
    check_positive_integer(count, "calibration prompt count")
    records = load_instructions(path)[first:]
    if len(records) < count:
        raise ValueError(f"{path} holds {len(records)} calibration records from record {first} on, "
                         f"fewer than the {count} asked for")
    return records[:count]


def calibration_prompts(tokenizer, count: int, template: str = "alpaca") -> list[list[int]]:
    """`calibration_records` encoded with the training template (`data.templates.encode_prompt`)."""
    return [encode_prompt(record, tokenizer, template) for record in calibration_records(count)]


def wilson_lower_bound(successes: torch.Tensor, trials: torch.Tensor, level: float) -> torch.Tensor:
    """One-sided Wilson score lower bound at `level` of a binomial rate (elementwise; level 0.5
    gives the raw rate successes / trials)."""
    z = NormalDist().inv_cdf(level)
    n = trials.double()
    rate = successes.double() / n
    centre = rate + z * z / (2 * n)
    spread = z * torch.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return ((centre - spread) / (1 + z * z / n)).clamp(0, 1)  # clamp: rounding below 0 at rate 0


# --------------------------------------------------------------------------------------------


@dataclass
class ExitStatistics:
    """Every exit's confidence and agreement with the full model at N generated positions."""

    measure: str
    confidence: dict[int, torch.Tensor]  # exit layer (below the last) -> (N,) float64
    agrees: dict[int, torch.Tensor]  # exit layer -> (N,) bool: its argmax is the full model's

    @property
    def num_tokens(self) -> int:
        return len(next(iter(self.agrees.values()))) if self.agrees else 0


@torch.inference_mode()
def teacher_forced_exits(model: CachedModel, prompt: list[int], tokens: list[int], layers) -> dict[int, torch.Tensor]:
    """{layer: (len(tokens), V) logits}: each layer's prediction of tokens[j] after prompt +
    tokens[:j], all in one causal pass over prompt + tokens[:-1]."""
    ids = torch.tensor([prompt + tokens[:-1]], device=model.device)
    hidden = model.model.hidden_states(ids, layers)
    return {layer: model.head(hidden[layer][0, len(prompt) - 1:], layer) for layer in layers}


def exit_statistics(model: CachedModel, prompts: list[list[int]], exits, measure: str = "max_prob",
                    max_new_tokens: int = 64, eos_token_id: int | None = None, batch_size: int = 8) -> ExitStatistics:
    """The full model's greedy continuation of each prompt, then one teacher-forced pass over it:
    at every generated position, each exit's confidence (`measure`) and whether its argmax equals
    the full model's (the full model's own argmax in the same pass, so rounding cannot split them)."""
    check_confidence_measure(measure)
    check_positive_integer(batch_size, "batch_size")
    L = model.num_layers
    layers = sorted(exit_thresholds(0.0, exits, L))
    continuations = []
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first:first + batch_size]
        continuations += generate_at_exit(model, batch, L, max_new_tokens, eos_token_id=eos_token_id).tokens
    scores = {layer: [] for layer in layers}
    agrees = {layer: [] for layer in layers}
    for prompt, tokens in zip(prompts, continuations):
        logits = teacher_forced_exits(model, prompt, tokens, layers + [L])
        full = logits[L].argmax(-1)  # (T,)
        for layer in layers:
            scores[layer].append(confidence(logits[layer], measure).double())
            agrees[layer].append(logits[layer].argmax(-1) == full)
    return ExitStatistics(measure, {layer: torch.cat(scores[layer]) for layer in layers},
                          {layer: torch.cat(agrees[layer]) for layer in layers})


@dataclass(frozen=True)
class Calibration:
    """A calibrated stopping rule and what it did on the calibration tokens."""

    target: float
    measure: str
    confidence_level: float
    thresholds: dict[int, float]  # exit layer -> threshold (1: never stops there)
    tokens: int  # calibration tokens
    stopped: dict[int, int]  # exit layer -> calibration tokens it stopped (the last layer: the rest)
    agreement: float  # of the rule on the calibration tokens (teacher-forced)
    mean_exit_layer: float

    def summary(self) -> str:
        rule = ", ".join(f"{layer}: {value:.4g}" for layer, value in self.thresholds.items())
        share = ", ".join(f"{layer}: {count / max(self.tokens, 1):.0%}" for layer, count in self.stopped.items())
        return (f"calibrated for agreement >= {self.target} ({self.measure}, Wilson bound at "
                f"{self.confidence_level}) on {self.tokens} tokens: thresholds {{{rule}}}; tokens stopped per "
                f"exit {{{share}}}; agreement {self.agreement:.4f}, mean exit layer {self.mean_exit_layer:.2f}")


def calibrate_thresholds(statistics: ExitStatistics, target: float, num_layers: int,
                         confidence_level: float = 0.95) -> Calibration:
    """Per-exit thresholds meeting `target` agreement on `statistics` (see the module docstring):
    exit by exit, shallow to deep, the largest set of the still-undecided tokens that the exit can
    stop with one threshold (its most confident ones) whose agreement's Wilson lower bound at
    `confidence_level` is >= target; threshold 1 where none qualifies."""
    check_target_agreement(target)
    check_confidence_level(confidence_level)
    N = statistics.num_tokens
    undecided = torch.ones(N, dtype=torch.bool)
    thresholds, stopped, disagreeing, depth = {}, {}, 0, 0
    for layer in sorted(statistics.confidence):
        scores, agrees = statistics.confidence[layer], statistics.agrees[layer]
        threshold = 1.0
        count = int(undecided.sum())
        if count:
            order = scores[undecided].argsort(descending=True)
            ranked, hits = scores[undecided][order], agrees[undecided][order].long().cumsum(0)
            sizes = torch.arange(1, count + 1)
            # A stop set is {confidence > t}: the top k, cut where the next confidence is lower
            # (t = that confidence, > 0 because threshold 0 stops every token), or all of them (t = 0).
            cut = torch.ones(count, dtype=torch.bool)
            cut[:-1] = (ranked[:-1] > ranked[1:]) & (ranked[1:] > 0)
            good = cut & (wilson_lower_bound(hits, sizes, confidence_level) >= target)
            if good.any():
                k = int(sizes[good].max())
                threshold = 0.0 if k == count else float(ranked[k])
        stops = undecided & ((scores > threshold) | (threshold == 0)) if threshold < 1 else torch.zeros_like(undecided)
        thresholds[layer] = threshold
        stopped[layer] = int(stops.sum())
        disagreeing += int((stops & ~agrees).sum())
        depth += layer * stopped[layer]
        undecided &= ~stops
    stopped[num_layers] = int(undecided.sum())
    depth += num_layers * stopped[num_layers]
    return Calibration(target, statistics.measure, confidence_level, thresholds, N, stopped,
                       1 - disagreeing / N if N else 1.0, depth / N if N else float(num_layers))


def calibrate(model: CachedModel, prompts: list[list[int]], target: float, measure: str = "max_prob", exits=None,
              max_new_tokens: int = 64, eos_token_id: int | None = None, confidence_level: float = 0.95,
              batch_size: int = 8) -> Calibration:
    """Per-exit thresholds for dynamic exit over `exits` (default: the training default for the
    depth) meeting `target` agreement on `prompts`: `exit_statistics`, then `calibrate_thresholds`."""
    check_target_agreement(target)
    check_confidence_level(confidence_level)
    statistics = exit_statistics(model, prompts, exits, measure, max_new_tokens, eos_token_id, batch_size)
    return calibrate_thresholds(statistics, target, model.num_layers, confidence_level)


def prefix_agreement(model: CachedModel, prompts: list[list[int]], generation: Generation) -> tuple[int, int]:
    """(agreeing, total) emitted tokens: a token agrees when it is the full model's greedy token
    after the same prompt and the same emitted tokens before it (one teacher-forced pass each)."""
    agreeing = total = 0
    for prompt, tokens in zip(prompts, generation.tokens):
        if tokens:
            full = teacher_forced_exits(model, prompt, tokens, [model.num_layers])[model.num_layers].argmax(-1)
            agreeing += int((full == torch.tensor(tokens, device=full.device)).sum())
            total += len(tokens)
    return agreeing, total
