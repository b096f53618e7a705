"""Confidence-based dynamic exit: each token stops at the first exit confident enough.

See `generate_dynamic` for how the deeper layers' keys/values of early-exited tokens are filled
(they are recomputed exactly, not approximated).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from soft_ds.exits import check_exit_layer, check_exit_layers, default_exit_layers
from soft_ds.inference.cache import KVCache
from soft_ds.inference.core import (GREEDY, CachedModel, Generation, Outputs, Sampling, check_confidence_measure,
                                    confidence, pick)


def check_threshold(threshold: float, name: str = "threshold") -> float:
    if not 0 <= threshold <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {threshold}")
    return threshold


def exit_thresholds(threshold: float | Mapping[int, float], exits, num_layers: int) -> dict[int, float]:
    """The stopping rule as {exit layer: threshold}, one per exit below the last layer (the last
    layer always decides). A float applies to every exit of `exits` (default: the training default
    for the depth); a mapping is the rule itself (e.g. `calibrate.calibrate_thresholds`'s), its
    keys the exits (1..num_layers - 1), and `exits` is not used. ValueError naming a bad entry."""
    if isinstance(threshold, Mapping):
        return {check_exit_layer(layer, num_layers, "threshold exit", deepest=num_layers - 1):
                check_threshold(value, f"threshold of exit {layer}") for layer, value in sorted(threshold.items())}
    check_threshold(threshold)
    exits = check_exit_layers(default_exit_layers(num_layers) if exits is None else exits, num_layers)
    return {layer: threshold for layer in exits if layer < num_layers}


@torch.inference_mode()
def generate_dynamic(model: CachedModel, prompts: list[list[int]], threshold: float | Mapping[int, float],
                     measure: str = "max_prob", exits=None, max_new_tokens: int = 64, sampling: Sampling = GREEDY,
                     eos_token_id: int | None = None) -> Generation:
    """Each token stops at the first exit whose confidence exceeds that exit's threshold.

    confidence: `measure` of the exit's softmax ("max_prob" or "margin", see `confidence`),
    compared strictly (confidence > threshold). threshold: one float for every exit of `exits`
    (default: `exits.default_exit_layers` for the depth), or per-exit thresholds {exit layer:
    threshold} (`exit_thresholds`; `calibrate.calibrate_thresholds` chooses them for a requested
    agreement with the full model), equal to the float when all are equal. Threshold 0 stops every
    token at that exit; threshold 1 never stops there (no confidence exceeds 1), so that exit's
    head is not even computed, and all thresholds 1 is the full model. The last layer decides when
    no exit is confident. The prompt's pass is decided like a token's: it stops at its last
    position's exit.

    The deeper layers' keys/values of an early-exited token are RECOMPUTED, not approximated.
    A token that stops at layer e keeps its layer-e hidden state; the next token that goes
    deeper than e carries it along: at each layer j > e, the rows of all tokens whose layer-j
    keys/values are missing join the current token's row, in column order, and that layer
    fills them before the current token attends (Bae et al. 2023, "FREE", synchronized
    parallel decoding). Every layer a token runs therefore sees exactly the keys/values the
    full model would have, and every exit's logits equal that exit's logits on the same
    tokens: the only approximation is the choice of exit itself.
    Why not CALM's propagation (copy the exit hidden state into the deeper layers' K/V
    projections)? It is cheaper per token but makes every later token's deep layers attend to
    approximate keys/values, so errors compound along the sequence, and the exits stop
    being the trained sub-models. Recomputing costs extra rows, not extra passes: the
    deferred tokens ride in the next deep pass, whose cost on memory-bound decoding (a GPU
    reads the weights once per pass) barely grows with a few more rows; on a CPU the rows
    cost more, and a run of early exits ending in a deep token pays for the run then.

    In a batch the depth of a step is that of its least confident sequence; each sequence
    still takes its token from its own first confident exit.
    """
    check_confidence_measure(measure)
    L = model.num_layers
    model.check_prompts(prompts, max_new_tokens)
    # No confidence exceeds 1, so an exit of threshold 1 is not checked (its head would be wasted).
    stops = {layer: value for layer, value in exit_thresholds(threshold, exits, L).items() if value < 1}
    rule = dict(stops=stops, measure=measure, sampling=sampling,
                generator=sampling.generator(model.device))
    out = Outputs(len(prompts), max_new_tokens, eos_token_id)
    deferred: dict[int, torch.Tensor] = {}  # column -> (B, H) output of its deepest layer so far
    # The prompt is a pass like any other: it goes only as deep as its last token's exit.
    cache, x, positions = model.start(prompts, max_new_tokens)
    token, exit_layer = _dynamic_pass(model, cache, x, 0, deferred, out.active(model.device), **rule)
    steps = 0
    while True:
        for row, (value, layer) in enumerate(zip(token.tolist(), exit_layer.tolist())):
            out.add(row, [value], layer)
        if out.all_done:
            break
        x, _ = model.embed_new(cache, token, positions)
        token, exit_layer = _dynamic_pass(model, cache, x, cache.columns - 1, deferred, out.active(model.device),
                                          **rule)
        positions = positions + 1
        steps += 1
    return Generation(out.tokens, steps=steps, exit_layers=out.exit_layers)


def _dynamic_pass(model: CachedModel, cache: KVCache, x: torch.Tensor, first_row: int, deferred: dict, undecided,
                  stops, measure, sampling, generator):
    """Deepen the rows x (B, R, H) of columns first_row.. until every sequence in `undecided`
    has a confident exit; return each sequence's (token, exit layer) for the last column.

    At layer i, the columns whose layer-i keys/values are missing (tokens that stopped above
    it) join as rows, from their deepest hidden state kept in `deferred`; afterwards every
    row's new deepest hidden state is kept there, or dropped once the row reached layer L.
    stops: {exit layer: threshold} of the exits checked (thresholds below 1).
    """
    L, end = model.num_layers, cache.columns
    undecided = undecided.clone()
    token = torch.zeros(undecided.shape, dtype=torch.long, device=undecided.device)
    exit_layer = torch.full_like(token, L)
    rope, depth = None, 0
    for index in range(L):
        missing_from = cache.lengths[index]
        if missing_from < first_row:  # tokens that stopped at layer `index` join here
            joining = torch.stack([deferred[column] for column in range(missing_from, first_row)], dim=1)
            x = torch.cat([joining, x], dim=1)  # (B, R, H), rows in column order
            first_row, rope = missing_from, None
        if rope is None:
            rope = model.rope(cache.positions[:, first_row:end])
        x = model.layers[index].forward_cached(x, *rope, cache, index)
        depth = index + 1
        if depth in stops or depth == L:
            logits = model.head(x[:, -1], depth)  # (B, V)
            threshold = stops.get(depth)
            confident = undecided if depth == L else undecided & (
                (confidence(logits, measure) > threshold) | (threshold == 0))
            if confident.any():
                token = torch.where(confident, pick(logits, sampling, generator), token)
                exit_layer = torch.where(confident, torch.full_like(exit_layer, depth), exit_layer)
                undecided &= ~confident
            if not undecided.any():
                break
    for offset, column in enumerate(range(first_row, end)):
        if depth < L:
            deferred[column] = x[:, offset]
        else:
            deferred.pop(column, None)
    return token, exit_layer
