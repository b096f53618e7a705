"""Exit-aligned, compute-balanced pipeline stage boundaries.

A stage ends right after an exit, so every exit's loss is computed on the stage that holds its
layer and no logits cross a stage boundary. Among the aligned cuts we pick the one whose most
expensive stage is cheapest, counting each exit's head (norm + lm_head + cross-entropy), which
for LLaMA 2 13B costs about half a decoder layer. With a single exit (SFT) any layer is a cut.

Used by training (pipe.py) and by the planner, so a plan is the run.
"""

from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Stage:
    first_layer: int  # 1-based, inclusive
    last_layer: int  # 1-based, inclusive
    exits: tuple[int, ...]
    cost: float

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.last_layer + 1)


def decoder_layer_flops(config, seq_len: int) -> float:
    """Forward FLOPs of one decoder layer per token (matmuls; attention scores at length seq_len)."""
    h, i = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv = config.num_key_value_heads or heads
    d = getattr(config, "head_dim", None) or h // heads
    projections = h * heads * d + 2 * h * kv * d + heads * d * h  # q, k, v, o
    mlp = 3 * h * i
    attention = 2 * heads * d * seq_len / 2  # QK^T and AV over the causal half, per token
    return 2.0 * (projections + mlp + attention)


def head_flops(config) -> float:
    """Forward FLOPs of one exit head per token (lm_head matmul; the norm and softmax are small)."""
    return 2.0 * config.hidden_size * config.vocab_size


def head_to_layer_ratio(config, seq_len: int) -> float:
    """FLOPs of one exit head / one decoder layer (LLaMA 2 13B at seq 512: 0.512)."""
    return head_flops(config) / decoder_layer_flops(config, seq_len)


def exit_flop_ratio(config, exit_layer: int, context: float) -> float:
    """FLOPs per decoded token of the full model / of exit n (its n layers and the head), at
    `context` tokens of context: the most that decoding at exit n can gain over the full model."""
    # Decoding one token at context c attends over c keys: decoder_layer_flops counts the causal
    # half of its seq_len, so seq_len = 2c gives the per-token attention at context c.
    layer, head = decoder_layer_flops(config, 2 * context), head_flops(config)
    return (config.num_hidden_layers * layer + head) / (exit_layer * layer + head)


def partition(num_layers: int, exit_layers, num_stages: int, layer_cost: float = 1.0,
              head_cost: float = 0.0) -> list[Stage]:
    """Split layers 1..num_layers into num_stages stages; see the module docstring."""
    exits = sorted(exit_layers)
    if num_stages < 1:
        raise ValueError(f"pipeline degree must be >= 1, got {num_stages}")
    if not exits or exits[-1] != num_layers:
        raise ValueError(f"the last layer ({num_layers}) must be an exit, exits: {exits}")
    # Candidate cut points: a stage may end after layer c for c in cuts (and must end at num_layers).
    cuts = exits[:-1] if len(exits) > 1 else list(range(1, num_layers))
    if num_stages - 1 > len(cuts):
        if len(exits) > 1:
            raise ValueError(
                f"{num_stages} pipeline stages cannot be aligned to exits {exits}: each stage must end "
                f"right after an exit, so at most {len(exits)} stages are possible; use a pipeline degree "
                f"<= {len(exits)} or add exits")
        raise ValueError(f"{num_stages} pipeline stages for a {num_layers}-layer model: at most "
                         f"{num_layers} stages")
    ends = cuts + [num_layers]

    def cost(first: int, last: int) -> float:
        return (last - first + 1) * layer_cost + sum(head_cost for e in exits if first <= e <= last)

    @lru_cache(maxsize=None)
    def best(start_idx: int, stages_left: int, first_layer: int):
        """(max cost, sum of squared costs, ends) for layers first_layer.. using stages_left stages."""
        if stages_left == 1:
            c = cost(first_layer, num_layers)
            return (c, c * c, (num_layers,))
        options = []
        # Leave at least stages_left - 1 ends for the remaining stages.
        for j in range(start_idx, len(ends) - (stages_left - 1)):
            c = cost(first_layer, ends[j])
            rest = best(j + 1, stages_left - 1, ends[j] + 1)
            options.append((max(c, rest[0]), c * c + rest[1], (ends[j],) + rest[2]))
        return min(options)  # minimise the slowest stage, then the spread

    stage_ends = best(0, num_stages, 1)[2]
    stages, first = [], 1
    for last in stage_ends:
        stages.append(Stage(first, last, tuple(e for e in exits if first <= e <= last), cost(first, last)))
        first = last + 1
    return stages


def plan_stages(config, exit_layers, num_stages: int, seq_len: int) -> list[Stage]:
    """Stage boundaries for a LlamaConfig, heads costed by FLOPs at seq_len: what training runs."""
    return partition(config.num_hidden_layers, exit_layers, num_stages, layer_cost=1.0,
                     head_cost=head_flops(config) / decoder_layer_flops(config, seq_len))


def balance_ratio(stages: list[Stage]) -> float:
    """Slowest stage / mean stage cost (1.0 = perfectly balanced)."""
    costs = [s.cost for s in stages]
    return max(costs) / (sum(costs) / len(costs))
