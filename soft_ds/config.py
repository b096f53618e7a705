"""The run configuration: one typed, strict object built from a `ds_configs/*.json` file plus
command-line overrides, and the DeepSpeed config dict derived from it.

A config file is a DeepSpeed config with one extra block, "soft", for what DeepSpeed does not
know (pipeline degree, exits, steps, sequence length). Each number has one home:

* micro-batch and gradient accumulation: DeepSpeed's `train_micro_batch_size_per_gpu` and
  `gradient_accumulation_steps`; `train_batch_size` is derived (= micro x accumulation x data
  parallel) and, if a file states it, must agree;
* learning rate: `optimizer.params.lr`; the schedule (linear warm-up, then cosine,
  `RunConfig.lr_multiplier`) is derived from `soft.train_steps`, `soft.warmup_steps` and
  `soft.min_lr_ratio`: a file may not carry a "scheduler" block of its own;
* steps: `soft.train_steps`.
"""

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from soft_ds.exit_schedule import SCHEDULES, ExitSchedule
from soft_ds.exits import resolve_exit_loss
from soft_ds.settings import AUTO, ConfigError, DeepSpeedSettings, SoftOptions, check, ds_value, flag, set_ds_value

# DeepSpeed keys a config file may carry (passed through after validation).
DEEPSPEED_KEYS = {
    "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "optimizer",
    "gradient_clipping", "bf16", "zero_optimization", "pipeline", "steps_per_print",
    "wall_clock_breakdown", "communication_data_type", "checkpoint", "comms_logger", "flops_profiler",
    "data_types",  # only {"grad_accum_dtype": "fp32"}, which bf16 runs get anyway
    "fp16", "torch_autocast",  # accepted only to be refused with a clear message
}
OPTIMIZER_PARAMS = {"lr", "betas", "eps", "weight_decay"}


@dataclass
class RunConfig:
    ds: dict  # the DeepSpeed keys from the file (without "soft")
    soft: SoftOptions = field(default_factory=SoftOptions)
    autocast_reason: str = ""  # why soft.autocast is what it is, once resolved (precision.resolve_autocast)

    @property
    def compute_dtype(self):  # -> torch.dtype
        """The dtype the decoder layers' matmuls and attention run in (what picks the attention kernel)."""
        import torch
        return torch.bfloat16 if self.bf16 or self.soft.autocast is True else torch.float32

    @property
    def micro_batch_size(self) -> int:
        return ds_value(self.ds, "micro_batch_size")

    @property
    def grad_accum(self) -> int:
        return ds_value(self.ds, "grad_accum")

    @property
    def lr(self) -> float:
        return ds_value(self.ds, "lr")

    @property
    def zero_stage(self) -> int:
        return ds_value(self.ds, "zero_stage")

    @property
    def bf16(self) -> bool:
        return ds_value(self.ds, "bf16")

    @property
    def precision(self) -> str:
        """What the progress banner calls this run's arithmetic."""
        if self.bf16:
            return "bf16 (fp32 master weights and gradient accumulation)"
        return {True: "fp32 + bf16 autocast", False: "fp32", AUTO: "fp32, bf16 autocast auto"}[self.soft.autocast]

    @property
    def exit_loss(self) -> str:
        """The exit loss implementation this run uses (soft.exit_loss with "auto" resolved)."""
        return resolve_exit_loss(self.soft.exit_loss, self.bf16)

    def data_parallel_size(self, world_size: int) -> int:
        pp = self.soft.pipeline_stages
        if world_size % pp:
            raise ConfigError(f"world size {world_size} is not divisible by pipeline_stages={pp}: "
                              f"launch a multiple of {pp} processes")
        return world_size // pp

    def train_batch_size(self, world_size: int) -> int:
        return self.micro_batch_size * self.grad_accum * self.data_parallel_size(world_size)

    def deepspeed_config(self, world_size: int, cpu: bool) -> dict:
        """DeepSpeed's config dict, with batch size and schedule derived from this config."""
        dp = self.data_parallel_size(world_size)
        derived = self.train_batch_size(world_size)
        stated = self.ds.get("train_batch_size")
        if stated is not None and stated != derived:
            raise ConfigError(
                f"train_batch_size={stated} does not multiply out: micro batch {self.micro_batch_size} x "
                f"gradient accumulation {self.grad_accum} x data parallel {dp} (= {world_size} processes / "
                f"{self.soft.pipeline_stages} stages) = {derived}")
        ds = json.loads(json.dumps(self.ds))
        ds["train_batch_size"] = derived
        ds["optimizer"]["params"].setdefault("weight_decay", 0.0)
        # torch's AdamW everywhere, its fused CUDA kernel on GPUs: DeepSpeed's FusedAdam is built by
        # JIT on first use, which needs nvcc and ninja on every node and serialises the ranks of a
        # node on one build lock; torch's ships compiled and computes the same update.
        ds["optimizer"]["params"]["torch_adam"] = True
        if not cpu:
            ds["optimizer"]["params"]["fused"] = True
        ds.update(precision_keys(self.bf16))
        pipeline = ds.setdefault("pipeline", {})
        # Reentrant checkpointing breaks on the embedding and on tuple backward; non-reentrant is exact.
        pipeline["use_reentrant"] = False
        pipeline["activation_checkpoint_interval"] = 1 if self.soft.activation_checkpointing else 0
        ds.setdefault("steps_per_print", 10**9)  # our own progress line replaces DeepSpeed's
        ds.pop("fp16", None)
        return ds

    def exit_schedule(self) -> ExitSchedule:
        s = self.soft
        return ExitSchedule(s.exit_schedule, s.exit_sample_k, s.exit_warmup_steps, s.seed)

    def lr_multiplier(self, step: int) -> float:
        """LR / peak LR for optimizer step `step` (0-based): linear warm-up that reaches the peak at
        the last warm-up step (no step at lr 0), then cosine decay to min_lr_ratio at the end."""
        s = self.soft
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        progress = min(1.0, (step - s.warmup_steps) / max(1, s.train_steps - 1 - s.warmup_steps))
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def precision_keys(bf16: bool) -> dict:
    """The DeepSpeed keys a run's precision needs beyond its "bf16" block.

    bf16: fp32 gradient accumulation. Without it DeepSpeed keeps bf16 gradients under ZeRO-1
    (DeepSpeedZeroOptimizer) and sums every exit's head gradient over every micro-batch, and the tied
    head's all-reduce, in 8 bits of mantissa; with it DeepSpeed builds its BF16_Optimizer (fp32
    gradient buffers beside the fp32 master weights)."""
    return {"data_types": {"grad_accum_dtype": "fp32"}} if bf16 else {}


def _check_keys(given: dict, allowed, where: str):
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _soft_options(block: dict, where: str) -> SoftOptions:
    """The "soft" block as SoftOptions; its values are checked with the rest (check_config)."""
    _check_keys(block, {f.name for f in dataclasses.fields(SoftOptions)}, f"{where} \"soft\"")
    return SoftOptions(**block)


def load_config(path: str) -> RunConfig:
    if not os.path.isfile(path):
        raise ConfigError(f"DeepSpeed config {path!r} not found")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    soft = raw.pop("soft", {})
    if "scheduler" in raw:
        raise ConfigError(f"{path}: remove the \"scheduler\" block: the warm-up + cosine schedule is derived "
                          f"from soft.train_steps, soft.warmup_steps and soft.min_lr_ratio")
    _check_keys(raw, DEEPSPEED_KEYS, path)
    optimizer = raw.get("optimizer")
    if not optimizer or optimizer.get("type", "").lower() not in ("adamw", "adam"):
        raise ConfigError(f"{path}: needs an \"optimizer\" block of type AdamW with params.lr")
    _check_keys(optimizer.get("params", {}), OPTIMIZER_PARAMS, f"{path} optimizer.params")
    if "lr" not in optimizer.get("params", {}):
        raise ConfigError(f"{path}: optimizer.params.lr is required")
    if raw.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{path}: fp16 is not supported; use bf16")
    if "torch_autocast" in raw:
        raise ConfigError(f"{path}: remove the \"torch_autocast\" block and set \"autocast\": true in the \"soft\" "
                          "block: each layer then enters autocast itself, which activation checkpointing's "
                          "recomputation needs")
    if raw.get("data_types", {}) not in ({}, {"grad_accum_dtype": "fp32"}):
        raise ConfigError(f"{path}: \"data_types\" {raw['data_types']}: soft-ds accumulates gradients in fp32 "
                          "(bf16 would sum every exit's head gradient in 8 bits of mantissa); remove the block")
    config = RunConfig(ds=raw, soft=_soft_options(soft, path))
    check_config(config, path)
    return config


def override(config: RunConfig, **values) -> RunConfig:
    """A copy of `config` with command-line overrides (settings.overrides) applied and validated;
    None means "not given"."""
    config = copy.deepcopy(config)
    deepspeed_names = {f.name for f in dataclasses.fields(DeepSpeedSettings)}
    for name, value in values.items():
        if value is None:
            continue
        if name not in deepspeed_names and not hasattr(config.soft, name):
            raise ConfigError(f"unknown option {name!r}")
        check(name, value, "command line", label=flag(name))
        if name in deepspeed_names:
            set_ds_value(config.ds, name, value)
        else:
            setattr(config.soft, name, value)
    check_config(config, "command line")
    return config


def check_config(config: RunConfig, where: str = "config"):
    """Each setting's own type and bounds (settings.check), then the rules between settings."""
    s = config.soft
    for f in dataclasses.fields(SoftOptions):
        check(f.name, getattr(s, f.name), where, label=f"soft.{f.name}")
    for f in dataclasses.fields(DeepSpeedSettings):
        check(f.name, ds_value(config.ds, f.name), where, label=f.metadata["ds_key"])
    if config.exit_loss != "whole" and s.exit_chunk_tokens < 1:
        raise ConfigError(f"exit_chunk_tokens={s.exit_chunk_tokens}: the {config.exit_loss} exit loss works in chunks "
                          "of counted tokens, so it must be >= 1 (exit_loss 'whole' computes them all at once)")
    check_exit_schedule(s)
    if s.warmup_steps > s.train_steps:
        raise ConfigError(f"warmup_steps={s.warmup_steps} exceeds train_steps={s.train_steps}")
    if config.lr <= 0:
        raise ConfigError(f"learning rate must be > 0, got {config.lr}")
    if s.autocast is True and config.bf16:
        raise ConfigError("bf16 and autocast are both on: choose one (bf16: bf16 weights and activations; "
                          "autocast: fp32 weights, bf16 matmuls)")
    if config.bf16 and config.zero_stage != 1:
        raise ConfigError("bf16 needs zero_optimization.stage 1: DeepSpeed accumulates bf16 runs' gradients in fp32 "
                          "(its BF16_Optimizer) only under ZeRO-1, and without ZeRO it would sum every exit's head "
                          "gradient in bf16 (ZeRO-1 itself only partitions the optimizer state over data-parallel ranks)")


def check_exit_schedule(s: SoftOptions, number_of_exits: int | None = None):
    """soft.exit_schedule and its options; number_of_exits (default: len(soft.exits), when given)
    bounds exit_sample_k."""
    if s.exit_schedule not in SCHEDULES:
        raise ConfigError(f"exit_schedule must be one of {', '.join(SCHEDULES)}, got {s.exit_schedule!r}")
    if s.mode != "soft" and (s.exit_schedule != "all" or s.exit_warmup_steps):
        raise ConfigError(f"exit_schedule {s.exit_schedule!r} with exit_warmup_steps {s.exit_warmup_steps} needs "
                          f"mode soft: mode {s.mode} has " + ("one exit" if s.mode == "sft" else
                                                               "a head of its own per exit") +
                          "; use exit_schedule all and exit_warmup_steps 0")
    if s.exit_warmup_steps > s.train_steps:
        raise ConfigError(f"exit_warmup_steps={s.exit_warmup_steps} exceeds train_steps={s.train_steps}")
    if s.exit_schedule == "all":
        if s.exit_sample_k:
            raise ConfigError(f"exit_sample_k {s.exit_sample_k} applies to exit_schedule random-k or rotate, "
                              "not all (every exit every step)")
        return
    if number_of_exits is None and s.exits is not None:
        number_of_exits = len(set(s.exits))
    if s.exit_sample_k < 1 or (number_of_exits is not None and s.exit_sample_k > number_of_exits):
        bound = f"1..{number_of_exits}" if number_of_exits is not None else ">= 1"
        raise ConfigError(f"exit_schedule {s.exit_schedule} draws exit_sample_k exits per step (the last layer "
                          f"included) out of {number_of_exits or 'the'} exits: it must be {bound}, "
                          f"got {s.exit_sample_k}")
