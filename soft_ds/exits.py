"""Exit records and the exit loss.

SoFT's loss is L = sum_n w_n * L_n / sum_n w_n over the exits n in B, where L_n is the token-mean
cross-entropy of `head(hidden after layer n)` on the response tokens (paper: uniform w_n = 1).
SFT is the same with B = {last layer}. SFT+ICT (the paper's early-exit baseline) trains, on a
frozen SFT model, a separate head for each exit below the last layer (`Exit.own_head`); the last
layer's exit is evaluated with the model's own head but not trained (weight 0).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100

# The paper's exit set for LLaMA 2 13B (40 layers); for other depths the default is every 4th layer
# from 30% depth, always ending at the last layer.
PAPER_EXITS_40 = (12, 16, 20, 24, 28, 32, 36, 40)


@dataclass(frozen=True)
class Exit:
    layer: int  # number of decoder layers before this exit (1-based depth)
    weight: float = 1.0  # share of the loss; 0: evaluated, not trained (ICT's frozen last layer)
    own_head: bool = False  # SFT+ICT: a head of its own instead of the shared one


def default_exit_layers(num_layers: int) -> tuple[int, ...]:
    if num_layers == 40:
        return PAPER_EXITS_40
    if num_layers <= 8:
        return tuple(range(2, num_layers + 1, 2)) if num_layers % 2 == 0 else tuple(range(1, num_layers + 1))
    step = max(1, num_layers // 10)
    first = max(1, round(0.3 * num_layers))
    return tuple(sorted(set(range(num_layers, first - 1, -step))))


def check_exit_layer(layer, num_layers: int, name: str = "exit", deepest: int | None = None) -> int:
    """One exit layer, an integer in 1..deepest (default: the model's depth); ValueError naming it.
    The one range check for a single exit: training, export, inference and every command use it."""
    deepest = num_layers if deepest is None else deepest
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= deepest:
        raise ValueError(f"{name} {layer!r} is out of range: the model has {num_layers} layers, so it must be "
                         f"an integer in 1..{deepest}")
    return layer


def check_exit_layers(layers, num_layers: int, what: str = "the model") -> tuple[int, ...]:
    """Sorted, de-duplicated exits, each in 1..num_layers; ValueError naming the bad ones.
    The one range check for a set of exits."""
    layers = tuple(sorted(set(int(layer) for layer in layers)))
    bad = [layer for layer in layers if not 1 <= layer <= num_layers]
    if not layers or bad:
        raise ValueError(f"exit(s) {bad or '(none)'} out of range for {what}: it has {num_layers} layers, "
                         f"so exits must be in 1..{num_layers}")
    return layers


def make_exits(layers, num_layers: int, weights=None, mode: str = "soft") -> tuple[Exit, ...]:
    """Validated, sorted exit records. mode="sft" keeps only the last layer; mode="ict" gives every
    exit below the last layer a head of its own and keeps the last layer as a weight-0 exit."""
    if mode not in ("soft", "sft", "ict"):
        raise ValueError(f"mode must be 'soft', 'sft' or 'ict', got {mode!r}")
    if mode == "sft":
        return (Exit(num_layers, 1.0),)
    layers = list(layers) if layers else list(default_exit_layers(num_layers))
    check_exit_layers(layers, num_layers)
    if len(set(layers)) != len(layers):
        raise ValueError(f"exit layers {layers} contain duplicates")
    if num_layers not in layers:
        raise ValueError(f"the last layer ({num_layers}) must be an exit (exits given: {sorted(layers)}); "
                         "otherwise the layers after the deepest exit would never be trained")
    if weights is None:
        weights = [1.0] * len(layers)
    if len(weights) != len(layers):
        raise ValueError(f"{len(weights)} exit weights given for {len(layers)} exits {layers}")
    if any(w <= 0 for w in weights):
        raise ValueError(f"exit weights must be positive, got {weights}")
    exits = sorted((Exit(int(n), float(w)) for n, w in zip(layers, weights)), key=lambda e: e.layer)
    if mode == "ict":
        if len(exits) < 2:
            raise ValueError("mode ict trains a head for each exit below the last layer: give at least one "
                             f"exit in 1..{num_layers - 1}")
        exits = [Exit(e.layer, e.weight, own_head=True) for e in exits[:-1]] + [Exit(num_layers, 0.0)]
    return tuple(exits)


def _token_ce_sum(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (N, V)
    return F.cross_entropy(logits, targets, reduction="sum")


def exit_loss(head, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 0) -> torch.Tensor:
    """Token-mean cross-entropy of head(hidden) against next-token `targets` (-100 = not counted).

    hidden (B, T, H), targets (B, T). Only the counted rows reach the head: an uncounted position
    (prompt, padding) adds nothing to the loss, so running norm + lm_head on it is wasted work, and
    at the paper's 512 tokens about 1 row in 8 counts. The gather's backward scatters the rows'
    gradients back, so every uncounted position gets an exact zero gradient.
    With chunk_tokens > 0 the logits are computed chunk by chunk (of counted tokens) under
    activation checkpointing, so at most one chunk's (chunk, V) logits are alive at a time instead
    of every exit's (counted, V) logits until backward; the price is one extra head forward.
    A micro-batch with no counted token contributes 0 (and zero gradients).
    """
    targets = targets.reshape(-1)  # (B*T,)
    counted = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (N,) row indices; a host sync on GPU
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, counted)  # (N, H)
    targets = targets.index_select(0, counted)  # (N,)
    chunk = chunk_tokens if chunk_tokens > 0 else max(len(targets), 1)
    recompute = chunk_tokens > 0 and torch.is_grad_enabled()
    # An empty batch still runs the head once on its (0, H) rows: the loss stays connected to the
    # head and hidden, so backward gives them zero gradients rather than none (as the pipeline needs).
    total = sum(checkpoint(_token_ce_sum, head, h, t, use_reentrant=False) if recompute
                else _token_ce_sum(head, h, t) for h, t in zip(hidden.split(chunk), targets.split(chunk)))
    return total / max(len(targets), 1)


def soft_loss(exit_losses: dict[int, torch.Tensor], exits) -> torch.Tensor:
    """Weighted mean of the per-exit losses (uniform weights: the paper's plain mean)."""
    total_weight = sum(e.weight for e in exits)
    return sum(exit_losses[e.layer] * (e.weight / total_weight) for e in exits)
