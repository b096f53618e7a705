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

from soft_ds.memo import TensorMemo
from soft_ds.settings import EXIT_LOSS_IMPLEMENTATIONS

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




def resolve_exit_loss(choice: str, bf16: bool) -> str:
    """The implementation an exit_loss choice means. "auto": fused in fp32, where it adds the head's
    weight gradient straight into the gradient (nothing (V, H) kept, nothing recomputed); chunked
    under bf16, where fused would keep a V x H weight gradient per exit per micro-batch in flight
    (13B, pp 4, grad_accum 8: +1.7-2.2 GiB per stage, `soft-ds plan`) to save one head forward on
    the counted tokens (+0.1-0.4% of a stage's FLOPs)."""
    if choice == "auto":
        return "chunked" if bf16 else "fused"
    return choice


def _token_ce_sum(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (N, V)
    return F.cross_entropy(logits, targets, reduction="sum")


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Token-mean cross-entropy of `normed @ weight.T` whose gradients are computed in the forward pass.

    normed (N, H): the counted rows after the head's norm; weight (V, H); targets (N,). Chunk by chunk
    of `chunk_tokens` rows: fp32 logits (chunk, V), the loss via logsumexp, grad_logits = softmax -
    onehot, and from it the input gradient (chunk, H) and the weight gradient (V, H), summed over the
    chunks. No logits outlive their chunk and backward recomputes nothing: it scales the gradients
    kept from the forward pass by the upstream gradient.

    The weight gradient kept for backward is a (V, H) tensor per call, alive until that backward (per
    exit per micro-batch in flight in a 1F1B pipeline). With `weight_grad_factor` (a float: the
    gradient the caller's backward will bring to this loss, which `backward` checks) it is instead
    added into `weight.grad` in the forward pass, already scaled, and nothing (V, H) is kept. That
    is only right when this forward runs once per backward (not recomputed under activation
    checkpointing) and `weight.grad` is where the gradient is read from (fp32 training; under bf16
    DeepSpeed's optimizer clears the bf16 gradients at each backward and reads its own fp32 buffers,
    so bf16 keeps the weight gradient instead: see `pipe.ExitLossSettings`).
    """

    @staticmethod
    def forward(ctx, normed, weight, targets, chunk_tokens: int, weight_grad_factor):
        count = len(targets)
        train_weight = ctx.needs_input_grad[1]  # False for a frozen head
        grad_normed = torch.zeros_like(normed)  # (N, H)
        direct = train_weight and weight_grad_factor is not None
        if direct and weight.dtype == torch.float32:
            # Summed chunk by chunk into the gradient itself: no (V, H) tensor of its own at all.
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            grad_weight, alpha = weight.grad, weight_grad_factor
        else:
            grad_weight = torch.zeros(weight.shape if train_weight else (0, 0), dtype=torch.float32,
                                      device=weight.device)  # (V, H)
            alpha = 1.0
        total = torch.zeros((), dtype=torch.float32, device=normed.device)
        for start in range(0, count, chunk_tokens):
            rows = normed[start:start + chunk_tokens]  # (C, H)
            chunk_targets = targets[start:start + chunk_tokens]  # (C,)
            logits = F.linear(rows, weight).float()  # (C, V), as the whole loss: head(hidden).float()
            log_norm = torch.logsumexp(logits, dim=-1)  # (C,)
            total += (log_norm - logits.gather(1, chunk_targets[:, None]).squeeze(1)).sum()
            grad_logits = logits.sub_(log_norm[:, None]).exp_()  # softmax, in the logits' storage
            grad_logits[torch.arange(len(chunk_targets), device=logits.device), chunk_targets] -= 1.0
            grad_logits /= count  # the token mean
            grad_low = grad_logits.to(weight.dtype)  # (C, V); the whole loss's backward casts it too
            grad_normed[start:start + chunk_tokens] = grad_low @ weight  # (C, H)
            if train_weight:
                grad_weight.addmm_(grad_low.t().float(), rows.float(), alpha=alpha)  # (V, H), fp32 sum
        ctx.weight_grad_factor = weight_grad_factor if direct else None
        if not direct:
            ctx.save_for_backward(grad_normed, grad_weight.to(weight.dtype))
        else:
            ctx.save_for_backward(grad_normed)
            if grad_weight is not weight.grad:  # a low-precision weight: scaled once, then added
                grad_weight.mul_(weight_grad_factor)
                if weight.grad is None:
                    weight.grad = grad_weight.to(weight.dtype)
                else:
                    weight.grad.add_(grad_weight.to(weight.dtype))
        return total / max(count, 1)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.weight_grad_factor is None:
            grad_normed, grad_weight = ctx.saved_tensors
            grad_weight = grad_weight * grad_output if ctx.needs_input_grad[1] else None
            return grad_normed * grad_output, grad_weight, None, None, None
        (grad_normed,) = ctx.saved_tensors
        factor = ctx.weight_grad_factor
        # Checked on the device, without a host sync (on a GPU the failure surfaces at the next sync).
        torch._assert_async((grad_output - factor).abs() <= 1e-6 * abs(factor),
                            f"the exit loss added its weight gradient scaled by {factor} in the forward pass, but "
                            "backward brought another gradient: keep the weight gradient (weight_grad_factor=None) "
                            "for this loss")
        return grad_normed * grad_output, None, None, None, None


def counted_rows(targets: torch.Tensor) -> torch.Tensor:
    """(N,) indices of the counted positions of (B, T) targets, flattened. Its size depends on the
    data, so on a GPU it is a host sync: every exit of a stage shares one per micro-batch."""
    return (targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


_counted_rows = TensorMemo()


def exit_loss(head, hidden: torch.Tensor, targets: torch.Tensor, implementation: str = "whole",
              chunk_tokens: int = 1024, weight_grad_factor: float | None = None) -> torch.Tensor:
    """Token-mean cross-entropy of head(hidden) against next-token `targets` (-100 = not counted).

    hidden (B, T, H), targets (B, T). Only the counted rows reach the head: an uncounted position
    (prompt, padding) adds nothing to the loss, so running norm + lm_head on it is wasted work, and
    at the paper's 512 tokens about 1 row in 8 counts. The gather's backward scatters the rows'
    gradients back, so every uncounted position gets an exact zero gradient.

    implementation:
    * "whole": one head forward over the counted rows; their (N, V) logits (and softmax) stay
      alive until backward.
    * "chunked": chunks of `chunk_tokens` counted rows under activation checkpointing: at most one
      chunk's (chunk, V) logits alive at a time; the price is one extra head forward.
    * "fused": `FusedLinearCrossEntropy` on the normed rows (the norm stays in autograd): gradients
      computed chunk by chunk in the forward pass, no logits kept, nothing recomputed. Needs
      `head.norm` and `head.output_weight`. weight_grad_factor: see FusedLinearCrossEntropy.
    Without autograd (evaluation) every implementation computes the same plain loss.
    A micro-batch with no counted token contributes 0 (and zero gradients).
    """
    if implementation not in EXIT_LOSS_IMPLEMENTATIONS:
        raise ValueError(f"exit loss implementation must be one of {EXIT_LOSS_IMPLEMENTATIONS}, got {implementation!r}")
    if implementation != "whole" and chunk_tokens <= 0:
        raise ValueError(f"the {implementation} exit loss needs chunk_tokens > 0, got {chunk_tokens}")
    counted = _counted_rows.get(targets, "counted", counted_rows)  # (N,): once per micro-batch, not per exit
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, counted)  # (N, H)
    targets = targets.reshape(-1).index_select(0, counted)  # (N,)
    if not torch.is_grad_enabled() or implementation == "whole":
        return _token_ce_sum(head, hidden, targets) / max(len(targets), 1)
    if implementation == "fused":
        weight = head.output_weight
        factor = weight_grad_factor if weight.requires_grad else None
        return FusedLinearCrossEntropy.apply(head.norm(hidden), weight, targets, chunk_tokens, factor)
    # An empty batch still runs the head once on its (0, H) rows: the loss stays connected to the
    # head and hidden, so backward gives them zero gradients rather than none (as the pipeline needs).
    total = sum(checkpoint(_token_ce_sum, head, h, t, use_reentrant=False)
                for h, t in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens)))
    return total / max(len(targets), 1)
