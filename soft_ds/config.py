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

from soft_ds.exits import EXIT_LOSS_CHOICES, resolve_exit_loss
from soft_ds.exit_schedule import SCHEDULES, ExitSchedule
from soft_ds.precision import AUTO

# DeepSpeed keys a config file may carry (passed through after validation).
DEEPSPEED_KEYS = {
    "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "optimizer",
    "gradient_clipping", "bf16", "zero_optimization", "pipeline", "steps_per_print",
    "wall_clock_breakdown", "communication_data_type", "checkpoint", "comms_logger", "flops_profiler",
    "data_types",  # only {"grad_accum_dtype": "fp32"}, which bf16 runs get anyway
    "fp16", "torch_autocast",  # accepted only to be refused with a clear message
}
OPTIMIZER_PARAMS = {"lr", "betas", "eps", "weight_decay"}
# Prompt templates (soft_ds.data renders them): Stanford Alpaca's text, or the tokenizer's chat template.
TEMPLATES = ("alpaca", "chat")
# The key of an exported config.json that records the template its model was trained with
# (`soft-ds export` writes it; generation and evaluation default to it: data.checkpoint_template).
TEMPLATE_KEY = "soft_ds_template"


class ConfigError(ValueError):
    pass


@dataclass
class SoftOptions:
    """The "soft" block. Every field can be overridden on the command line."""
    pipeline_stages: int = 1  # pipeline degree; data-parallel degree = world size / this
    mode: str = "soft"  # "soft": loss at every exit; "sft": the last layer only; "ict": SFT+ICT heads
    exits: list | None = None  # exit layers (1-based depth); default: paper's B for 40 layers
    exit_weights: list | None = None  # per-exit loss weights; default uniform (the paper)
    # which exits train each step (soft_ds.exit_schedule): "all" (the paper), "random-k" (the last layer
    # and k-1 others drawn from (seed, step): SortedNet) or "rotate" (k-1 others in turn: LayerSkip)
    exit_schedule: str = "all"
    exit_sample_k: int = 0  # random-k / rotate: exits per step, the last layer included
    exit_warmup_steps: int = 0  # EE-LLM: intermediate exits' weights ramp linearly from 0 over N steps
    seq_len: int = 512  # tokens per row (fixed pipeline buffer shapes): records are packed into rows, or padded
    # several records per row, attention confined to each: every record gets the loss it gets alone
    # (tests/test_model.py), so it is on wherever a run has more than one record to put in a row
    packing: bool = True
    train_steps: int = 100  # optimizer steps
    warmup_steps: int = 0  # linear LR warm-up steps, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.0
    activation_checkpointing: bool = False  # recompute each decoder layer in backward
    # matmuls in bf16 under torch.autocast, entered by each layer (soft_ds.pipe.precision); weights,
    # gradients, optimizer, residual stream, norms and softmax stay fp32. DeepSpeed's "bf16" instead
    # keeps bf16 weights and activations. "auto": on where this machine's bf16 matmuls are faster
    # (soft_ds.precision.resolve_autocast: native bf16 GPUs; CPUs where a timed bf16 matmul wins)
    autocast: bool | str = "auto"
    # How each exit's loss is computed (soft_ds.exits.exit_loss; measured by soft_ds.bench.overhead):
    # "fused" computes the head's gradients in the forward pass chunk by chunk, keeps no logits and
    # recomputes nothing; "whole" keeps every exit's logits until backward; "chunked" recomputes
    # the head forward in backward. Default "auto": fused in fp32 (autocast included), chunked under bf16
    # (exits.resolve_exit_loss says why, with the figures; RunConfig.exit_loss resolves it).
    exit_loss: str = "auto"
    exit_chunk_tokens: int = 1024  # counted tokens per chunk of the chunked and fused exit losses
    val_size: int = 200  # held-out records for validation
    template: str = "alpaca"  # prompt template: "alpaca" text or the tokenizer's "chat" template
    eval_interval: int = 50  # validation every N steps (0: only at the end)
    eval_batches: int = 4  # validation micro-batches per data-parallel rank
    save_interval: int = 0  # checkpoint every N steps (0: only at the end)
    log_interval: int = 1  # console/TensorBoard every N steps
    seed: int = 1234


@dataclass
class RunConfig:
    ds: dict  # the DeepSpeed keys from the file (without "soft")
    soft: SoftOptions = field(default_factory=SoftOptions)
    autocast_reason: str = ""  # why soft.autocast is what it is, once resolved (precision.resolve_autocast)

    @property
    def compute_dtype(self) -> "torch.dtype":
        """The dtype the decoder layers' matmuls and attention run in (what picks the attention kernel)."""
        import torch
        return torch.bfloat16 if self.bf16 or self.soft.autocast is True else torch.float32

    @property
    def micro_batch_size(self) -> int:
        return int(self.ds.get("train_micro_batch_size_per_gpu", 1))

    @property
    def grad_accum(self) -> int:
        return int(self.ds.get("gradient_accumulation_steps", 1))

    @property
    def lr(self) -> float:
        return float(self.ds["optimizer"]["params"]["lr"])

    @property
    def zero_stage(self) -> int:
        return int(self.ds.get("zero_optimization", {}).get("stage", 0))

    @property
    def bf16(self) -> bool:
        return bool(self.ds.get("bf16", {}).get("enabled", False))

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
    defaults = SoftOptions()
    names = {f.name for f in dataclasses.fields(SoftOptions)}
    _check_keys(block, names, f"{where} \"soft\"")
    for name, value in block.items():
        _check_type(name, value, getattr(defaults, name), where)
    return SoftOptions(**block)


def _check_type(name, value, default, where="option"):
    if default is None:  # exits / exit_weights: a list of numbers
        ok = value is None or (isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
        expected = "a list of numbers"
    elif name == "autocast":
        ok, expected = isinstance(value, bool) or value == AUTO, 'true, false or "auto"'
    elif isinstance(default, bool):
        ok, expected = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, expected = isinstance(value, type(default)), f"a {type(default).__name__}"
    if not ok:
        raise ConfigError(f"{where}: soft.{name} must be {expected}, got {value!r}")


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
    if raw.get("zero_optimization", {}).get("stage", 0) > 1:
        raise ConfigError(f"{path}: ZeRO stage {raw['zero_optimization']['stage']} is incompatible with "
                          "pipeline parallelism; use stage 0 or 1")
    config = RunConfig(ds=raw, soft=_soft_options(soft, path))
    validate(config)
    return config


def override(config: RunConfig, **values) -> RunConfig:
    """A copy of `config` with command-line overrides applied (None = not given), validated.
    DeepSpeed-owned numbers have aliases."""
    config = copy.deepcopy(config)
    ds_aliases = {"micro_batch_size": "train_micro_batch_size_per_gpu",
                  "grad_accum": "gradient_accumulation_steps", "gradient_clipping": "gradient_clipping"}
    for name, value in values.items():
        if value is None:
            continue
        if name in ds_aliases:
            config.ds[ds_aliases[name]] = value
        elif name == "lr":
            config.ds["optimizer"]["params"]["lr"] = value
        elif name == "bf16":
            config.ds["bf16"] = {"enabled": bool(value)}
        elif name == "zero_stage":
            config.ds["zero_optimization"] = {**config.ds.get("zero_optimization", {}), "stage": value}
        else:
            if not hasattr(config.soft, name):
                raise ConfigError(f"unknown option {name!r}")
            _check_type(name, value, getattr(SoftOptions(), name), "command line")
            setattr(config.soft, name, value)
    validate(config)
    return config


def validate(config: RunConfig):
    s = config.soft
    if s.mode not in ("soft", "sft", "ict"):
        raise ConfigError(f"mode must be 'soft', 'sft' or 'ict', got {s.mode!r}")
    if s.template not in TEMPLATES:
        raise ConfigError(f"template must be one of {', '.join(TEMPLATES)}, got {s.template!r}")
    for name in ("pipeline_stages", "seq_len", "train_steps", "log_interval", "eval_batches"):
        if getattr(s, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(s, name)}")
    for name in ("warmup_steps", "exit_warmup_steps", "val_size", "eval_interval", "save_interval",
                 "exit_chunk_tokens"):
        if getattr(s, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(s, name)}")
    if s.exit_loss not in EXIT_LOSS_CHOICES:
        raise ConfigError(f"exit_loss must be one of {', '.join(EXIT_LOSS_CHOICES)}, got {s.exit_loss!r}")
    if config.exit_loss != "whole" and s.exit_chunk_tokens < 1:
        raise ConfigError(f"exit_chunk_tokens={s.exit_chunk_tokens}: the {config.exit_loss} exit loss works in chunks "
                          "of counted tokens, so it must be >= 1 (exit_loss 'whole' computes them all at once)")
    if not 0.0 <= s.min_lr_ratio <= 1.0:
        raise ConfigError(f"min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
    validate_exit_schedule(s)
    if s.warmup_steps > s.train_steps:
        raise ConfigError(f"warmup_steps={s.warmup_steps} exceeds train_steps={s.train_steps}")
    if config.micro_batch_size < 1 or config.grad_accum < 1:
        raise ConfigError(f"micro batch ({config.micro_batch_size}) and gradient accumulation "
                          f"({config.grad_accum}) must be >= 1")
    if config.lr <= 0:
        raise ConfigError(f"learning rate must be > 0, got {config.lr}")
    if config.zero_stage > 1:
        raise ConfigError("ZeRO stages 2 and 3 are incompatible with pipeline parallelism; use 0 or 1")
    if s.autocast is True and config.bf16:
        raise ConfigError("bf16 and autocast are both on: choose one (bf16: bf16 weights and activations; "
                          "autocast: fp32 weights, bf16 matmuls)")
    if config.bf16 and config.zero_stage != 1:
        raise ConfigError("bf16 needs zero_optimization.stage 1: DeepSpeed accumulates bf16 runs' gradients in fp32 "
                          "(its BF16_Optimizer) only under ZeRO-1, and without ZeRO it would sum every exit's head "
                          "gradient in bf16 (ZeRO-1 itself only partitions the optimizer state over data-parallel ranks)")


def validate_exit_schedule(s: SoftOptions, number_of_exits: int | None = None):
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
