"""The costs of a SoFT pipeline run before launching it (`soft-ds plan`): per-stage memory and FLOPs.

The stage boundaries come from `partition.plan_stages`, the very call `pipe.SoftPipelineModule`
makes, so the plan is the run. What a stage holds mirrors `pipe.py` (`hf_io.stage_tensor_names`):
stage 0 the token embedding; its decoder layers; and, if it holds at least one exit, ONE shared
head (final norm + lm_head), whatever the number of exits on it. Under tied embeddings the head's
matrix is the embedding, held (and counted) on stage 0 and on every stage with an exit, each with
the final norm. Parameter counts come from `model.hf_shapes`.

The memory model (bytes; deliberately simple, no allowance for the CUDA context, NCCL buffers or
fragmentation, so leave headroom):

Static, per parameter the stage holds (AdamW; dp = data-parallel degree):
    bf16:  2 (bf16 weight) + 2 (bf16 gradient) + 12 (fp32 master 4 + moments 8)
           ZeRO-1 divides the 12 fp32 optimizer bytes by dp.
    fp32:  4 (weight) + 4 (gradient) + 8 (moments); ZeRO-1 divides the 8 moment bytes by dp.

Activations, per micro-batch of B sequences of T tokens (a = 2 bytes under bf16, 4 under fp32;
H hidden, I intermediate, KV = kv_heads * head_dim, V vocabulary):
    one decoder layer, everything autograd keeps for backward:
        full_layer = B*T*a*(8H + 2KV + 4I)
        8H: the two norm inputs and outputs, q, the attention output and o_proj's input copy,
            one H for the norms' fp32 intermediates; 2KV: k and v; 4I: gate, silu(gate), up and
            their product. Attention is SDPA (flash / memory-efficient): no T^2 score matrix.
    without activation checkpointing: full_layer per layer held;
    with it (DeepSpeed checkpoints every layer): each layer's input B*T*H*a per layer held, plus
        one layer's full activations once per stage, alive while it is recomputed in backward.
    exits: the head sees only the counted tokens, N = counted_share * B*T of them (prompt and
        padding positions never reach it; about 0.12 of a padded 512-token Alpaca row counts). By
        the exit loss implementation (`exits.exit_loss`; C = min(exit_chunk_tokens, N)):
        whole:   N*(a*H + (a + 4)*V) per exit (norm output, logits, fp32 log-probabilities), kept
                 until backward;
        chunked: nothing per exit beyond its input; one chunk's C x V fp32 logits and their
                 gradient transient, once per stage;
        fused:   the input gradient N*H*a per exit kept until backward, and under bf16 the head's
                 V x H weight gradient (a bytes each) too; fp32 adds it straight into the gradient
                 instead. Transient once per stage: one chunk's C x V fp32 logits/softmax and their
                 a-byte copy, and under bf16 the V x H fp32 weight-gradient sum (fp32 sums it
                 straight into the gradient).
    in flight under 1F1B: stage s (0-based) holds min(pp - s, grad_accum) micro-batches.

FLOPs per micro-batch (B*T tokens; `partition.decoder_layer_flops` and `partition.head_flops`):
    3 x forward (forward + backward), plus one more decoder forward under activation
    checkpointing and one more head forward per exit under the chunked exit loss (its recompute);
    the heads' FLOPs are on the counted tokens only.
The pipeline bubble of 1F1B is (pp - 1) / (grad_accum + pp - 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import LlamaConfig

from soft_ds.config import load_config, override
from soft_ds.exits import make_exits
from soft_ds.settings import EXIT_LOSS_IMPLEMENTATIONS, ArgumentParser, ConfigError, HelpFormatter, add_flags, overrides
from soft_ds.hf_io import CheckpointError, read_llama_config_file, stage_tensor_names
from soft_ds.model import LLAMA2_SIZES, PRESETS, check_supported, head_dim, hf_shapes, llama2_config, preset_config
from soft_ds.partition import decoder_layer_flops, head_flops, plan_stages

GIB = 2**30
COMMAND_HELP = "Per-stage memory and FLOPs of a SoFT/SFT pipeline run, from the same partition training uses."

@dataclass(frozen=True)
class StageCost:
    stage: int  # 0-based pipeline stage
    first_layer: int  # 1-based, inclusive
    last_layer: int
    exits: tuple[int, ...]
    parameters: int  # held by this stage: embedding on stage 0, the shared head once if it has exits (tied: both)
    static_bytes: int  # weights + gradients + optimizer state
    activation_bytes: int  # per micro-batch, under the run's checkpointing setting
    activation_bytes_checkpointed: int  # per micro-batch, with activation checkpointing
    activation_bytes_full: int  # per micro-batch, without activation checkpointing
    transient_bytes: int  # alive once per stage: recompute of one layer, one exit-loss chunk
    in_flight: int  # micro-batches alive at once under 1F1B
    flops: float  # per micro-batch, forward + backward (+ recompute)
    memory_bytes: int  # static + in_flight * activation_bytes + transient_bytes
    gpu_bytes: int

    @property
    def fits(self) -> bool:
        return self.memory_bytes <= self.gpu_bytes


def load_model_config(model: str) -> LlamaConfig:
    """A named size (7B, 13B, 70B; or a test preset: debug, tiny), a config.json, or a checkpoint
    directory holding one. Only the config is read: no weights are needed to plan."""
    if model.upper() in LLAMA2_SIZES:
        return llama2_config(model)
    if model in PRESETS:
        return preset_config(model)
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise CheckpointError(f"--model {model!r} is neither a named size ({', '.join(LLAMA2_SIZES)}, "
                              f"{', '.join(PRESETS)}) nor an existing config.json or directory holding one")
    return read_llama_config_file(path)


def static_bytes_per_parameter(bf16: bool, zero_stage: int, data_parallel: int) -> float:
    if zero_stage not in (0, 1):
        raise ValueError(f"ZeRO stage must be 0 or 1 (pipeline parallelism), got {zero_stage}")
    shard = data_parallel if zero_stage == 1 else 1
    if bf16:
        return 2 + 2 + 12 / shard
    return 4 + 4 + 8 / shard


def layer_activation_bytes(config, tokens: int, act_bytes: int) -> int:
    """Everything one decoder layer keeps for backward, for `tokens` tokens (module docstring)."""
    h, i = config.hidden_size, config.intermediate_size
    kv = (config.num_key_value_heads or config.num_attention_heads) * head_dim(config)
    return tokens * act_bytes * (8 * h + 2 * kv + 4 * i)


def stage_costs(config, exit_layers=None, mode: str = "soft", pipeline_stages: int = 1, data_parallel: int = 1,
                micro_batch: int = 1, seq_len: int = 512, grad_accum: int = 1, bf16: bool = True,
                zero_stage: int = 0, activation_checkpointing: bool = False, exit_loss: str = "fused",
                exit_chunk_tokens: int = 1024, counted_share: float = 1.0, gpu_gib: float = 80.0) -> list[StageCost]:
    """One StageCost per pipeline stage of `partition.plan_stages` (the module docstring gives every formula)."""
    for name, value in (("data_parallel", data_parallel), ("micro_batch", micro_batch),
                        ("seq_len", seq_len), ("grad_accum", grad_accum)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if exit_loss not in EXIT_LOSS_IMPLEMENTATIONS:
        raise ValueError(f"exit loss must be one of {', '.join(EXIT_LOSS_IMPLEMENTATIONS)}, got {exit_loss!r}")
    if exit_loss != "whole" and exit_chunk_tokens < 1:
        raise ValueError(f"the {exit_loss} exit loss needs exit chunk tokens >= 1, got {exit_chunk_tokens}")
    if not 0.0 < counted_share <= 1.0:
        raise ValueError(f"counted share must be in (0, 1], got {counted_share}")
    check_supported(config)
    exits = make_exits(exit_layers, config.num_hidden_layers, mode=mode)
    stages = plan_stages(config, [e.layer for e in exits], pipeline_stages, seq_len)
    shapes = hf_shapes(config)
    per_param = static_bytes_per_parameter(bf16, zero_stage, data_parallel)
    a = 2 if bf16 else 4
    tokens = micro_batch * seq_len
    h, v = config.hidden_size, config.vocab_size
    full_layer = layer_activation_bytes(config, tokens, a)
    layer_flops = decoder_layer_flops(config, seq_len) * tokens
    counted = max(1, round(counted_share * tokens))  # the tokens an exit head computes
    exit_flops = head_flops(config) * counted
    chunk = min(exit_chunk_tokens, counted)
    if exit_loss == "whole":
        exit_kept, exit_transient = counted * (a * h + (a + 4) * v), 0
    elif exit_loss == "chunked":
        exit_kept, exit_transient = 0, chunk * v * 4 * 2
    else:  # fused: bf16 keeps the weight gradient for backward, fp32 adds it in the forward pass
        exit_kept = counted * h * a + (v * h * a if bf16 else 0)
        # fp32 sums the weight gradient straight into the gradient; bf16 sums it in fp32 first
        exit_transient = chunk * v * (4 + a) + (v * h * 4 if bf16 else 0)

    plans = []
    for index, stage in enumerate(stages):
        names = stage_tensor_names(config, [n - 1 for n in stage.layers], first_stage=index == 0,
                                   has_exit=bool(stage.exits))
        parameters = sum(shapes[name].numel() for name in names)
        layers, heads = len(stage.layers), len(stage.exits)
        exits_kept, exits_transient = heads * exit_kept, (exit_transient if heads else 0)
        checkpointed = layers * tokens * h * a + exits_kept
        full = layers * full_layer + exits_kept
        transient = exits_transient + (full_layer if activation_checkpointing else 0)
        activation = checkpointed if activation_checkpointing else full
        in_flight = min(pipeline_stages - index, grad_accum)
        static = int(round(parameters * per_param))
        forward = layers * layer_flops + heads * exit_flops
        flops = 3 * forward + (layers * layer_flops if activation_checkpointing else 0) \
            + (heads * exit_flops if exit_loss == "chunked" else 0)
        plans.append(StageCost(
            stage=index, first_layer=stage.first_layer, last_layer=stage.last_layer, exits=stage.exits,
            parameters=parameters, static_bytes=static, activation_bytes=activation,
            activation_bytes_checkpointed=checkpointed, activation_bytes_full=full,
            transient_bytes=transient, in_flight=in_flight, flops=flops,
            memory_bytes=static + in_flight * activation + transient, gpu_bytes=int(gpu_gib * GIB)))
    return plans


def flops_balance(plans: list[StageCost]) -> float:
    """Slowest stage / mean stage FLOPs (1.0 = balanced)."""
    flops = [p.flops for p in plans]
    return max(flops) / (sum(flops) / len(flops))


def bubble_fraction(pipeline_stages: int, grad_accum: int) -> float:
    """Idle fraction of a 1F1B schedule: (pp - 1) / (grad_accum + pp - 1)."""
    return (pipeline_stages - 1) / (grad_accum + pipeline_stages - 1)


def format_costs(plans: list[StageCost], grad_accum: int) -> str:
    """The table `soft-ds plan` prints, one row per stage, then the verdict line."""
    def gib(n):
        return f"{n / GIB:.2f}"

    header = (f"{'stage':>5}  {'layers':>7}  {'exits':<18} {'params':>14}  {'static GiB':>10}  "
              f"{'act/mb ckpt':>11}  {'act/mb full':>11}  {'in-flight':>9}  {'total GiB':>9}  "
              f"{'TFLOPs/mb':>9}  fits")
    rows = [header]
    for p in plans:
        exits = ",".join(map(str, p.exits)) or "-"
        rows.append(f"{p.stage:>5}  {f'{p.first_layer}-{p.last_layer}':>7}  {exits:<18} {p.parameters:>14,}  "
                    f"{gib(p.static_bytes):>10}  {gib(p.activation_bytes_checkpointed):>11}  "
                    f"{gib(p.activation_bytes_full):>11}  {p.in_flight:>9}  {gib(p.memory_bytes):>9}  "
                    f"{p.flops / 1e12:>9.2f}  {'yes' if p.fits else 'NO'}")
    slowest = max(plans, key=lambda p: p.flops)
    too_big = [p.stage for p in plans if not p.fits]
    pp = len(plans)
    rows.append(f"balance (max/mean FLOPs): {flops_balance(plans):.3f}   "
                f"1F1B bubble: {bubble_fraction(pp, grad_accum):.1%} (pp={pp}, grad_accum={grad_accum})")
    verdict = "every stage fits" if not too_big else f"stage(s) {too_big} do NOT fit"
    rows.append(f"slowest stage: {slowest.stage} (layers {slowest.first_layer}-{slowest.last_layer}, "
                f"{slowest.flops / 1e12:.2f} TFLOPs/micro-batch); {verdict} in "
                f"{plans[0].gpu_bytes / GIB:g} GiB (largest: {max(p.memory_bytes for p in plans) / GIB:.2f} GiB)")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# The command


# The settings a plan depends on: train's flags of the same names override the --ds-config file.
PLAN_SETTINGS = ("pipeline_stages", "mode", "exits", "seq_len", "activation_checkpointing", "exit_loss",
                 "exit_chunk_tokens", "micro_batch_size", "grad_accum", "bf16", "zero_stage")


def main(argv=None):
    """`soft-ds plan`: print the per-stage plan of a run."""
    p = ArgumentParser(description=COMMAND_HELP, formatter_class=HelpFormatter,
                       epilog="Formulas: see the docstring of soft_ds/costs.py.")
    p.add_argument("--ds-config", required=True, help="the run's DeepSpeed config with its 'soft' block, as train's")
    p.add_argument("--model", required=True,
                   help="7B, 13B or 70B (LLaMA 2 shapes), a test preset (debug, tiny), or a Hugging Face "
                        "config.json / checkpoint directory")
    p.add_argument("--world-size", type=int, default=None,
                   help="GPUs in the run: data parallel = world size / pipeline stages (default: one per stage)")
    p.add_argument("--counted-share", type=float, default=1.0,
                   help="share of a micro-batch's tokens that count in the loss (the heads compute only "
                        "those); about 0.12 for padded 512-token Alpaca rows")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory per device, GiB")
    add_flags(p, PLAN_SETTINGS)
    args = p.parse_args(argv)
    config = override(load_config(args.ds_config), **overrides(args))  # errors: one line from soft-ds
    soft = config.soft
    if soft.mode == "ict":
        raise ConfigError("plan estimates soft and sft runs; an ict run trains heads on a frozen model")
    dp = config.data_parallel_size(args.world_size or soft.pipeline_stages)
    model_config = load_model_config(args.model)
    plans = stage_costs(model_config, soft.exits, mode=soft.mode, pipeline_stages=soft.pipeline_stages,
                        data_parallel=dp, micro_batch=config.micro_batch_size, seq_len=soft.seq_len,
                        grad_accum=config.grad_accum, bf16=config.bf16, zero_stage=config.zero_stage,
                        activation_checkpointing=soft.activation_checkpointing, exit_loss=config.exit_loss,
                        exit_chunk_tokens=soft.exit_chunk_tokens, counted_share=args.counted_share,
                        gpu_gib=args.gpu_gib)
    print(f"{args.model}: {model_config.num_hidden_layers} layers, mode {soft.mode}, pp {soft.pipeline_stages} x dp "
          f"{dp}, micro-batch {config.micro_batch_size} x {soft.seq_len} tokens, grad_accum {config.grad_accum}, "
          f"{'bf16' if config.bf16 else 'fp32'}, ZeRO-{config.zero_stage}, activation checkpointing "
          f"{'on' if soft.activation_checkpointing else 'off'}, {config.exit_loss} exit loss, "
          f"counted share {args.counted_share:g}")
    print(format_costs(plans, config.grad_accum))
