"""Every setting of a training run, declared once, and the flags every command derives from them.

A setting is a field of `SoftOptions` (the config file's "soft" block) or of `DeepSpeedSettings`
(numbers that live in DeepSpeed's own keys, `ds_key`), declared with `setting(...)`: its default,
help line, choices, bounds, and whether a resumed run must keep it. From these declarations come:

* the config file's checks (`config.load_config`): unknown keys, types, choices, bounds;
* the flags of `soft-ds train`, `soft-ds plan` and `soft-ds bench overhead` (`add_flags`), each
  overriding the same-named value of the `--ds-config` file (`overrides`, then `config.override`),
  and the held-out split's flags of `soft-ds eval` (filled from its `--config`);
* the resume check (`RESUME_SETTINGS`), what a checkpoint records (`vars(SoftOptions)`) and what an
  export records in its config.json (`EXPORTED_SETTINGS`).

Adding a training option is one `setting(...)` line here; the code that reads it is the rest.

Flags have one spelling across every command, with hyphens (`--seq-len`): argparse's and the
GNU convention, torchrun's and most of this CLI's. The underscore spelling (`--seq_len`,
`--ds_config`: DeepSpeed's and Hugging Face's example scripts) is accepted everywhere as an
alias (`ArgumentParser`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field

from soft_ds.exit_schedule import SCHEDULES

AUTO = "auto"  # a setting decided from the machine or the run (soft_ds.precision, exits.resolve_exit_loss)
MODES = ("soft", "sft", "ict")
EXIT_LOSS_IMPLEMENTATIONS = ("whole", "chunked", "fused")  # soft_ds.exits implements each
EXIT_LOSS_CHOICES = (AUTO, *EXIT_LOSS_IMPLEMENTATIONS)
# Prompt templates (soft_ds.data.templates renders them): Stanford Alpaca's text, or the tokenizer's chat template.
TEMPLATES = ("alpaca", "chat")

# What a setting's value may be ("kind"): one of these, named in errors.
KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
         "ints": "a list of integers", "floats": "a list of numbers", "switch": 'true, false or "auto"'}


def setting(default, help: str, *, kind: str | None = None, choices: tuple | None = None,
            minimum: float | None = None, maximum: float | None = None, resume: bool = False,
            exported: bool = False, ds_key: str | None = None):
    """A dataclass field that declares one setting.

    kind: one of KINDS (default: the default's type); choices / minimum / maximum: what values
    pass; resume: a resumed run must keep the checkpoint's value (it decides which records each
    step reads or which exits its loss counts); exported: `soft-ds export` records it in the model's
    config.json (`export_key`); ds_key: the dotted DeepSpeed key that holds it."""
    kind = kind or type(default).__name__
    assert kind in KINDS, kind
    return field(default=default, metadata=dict(help=help, kind=kind, choices=choices, minimum=minimum,
                                                maximum=maximum, resume=resume, exported=exported,
                                                ds_key=ds_key))


@dataclass
class SoftOptions:
    """The config file's "soft" block: what DeepSpeed does not know."""
    pipeline_stages: int = setting(1, "pipeline degree; the data-parallel degree is world size / this", minimum=1)
    mode: str = setting("soft", "soft: loss at every exit through the shared head; sft: the last layer only; ict: "
                        "the SFT+ICT baseline, a separate head per exit trained on the frozen --model (an SFT "
                        "checkpoint)", choices=MODES, resume=True)
    exits: list | None = setting(None, "exit layers (1-based depth), e.g. 12,16,20,24,28,32,36,40; default: the "
                                 "paper's B for 40 layers; for other depths every layer from 30% of the depth in "
                                 "steps of a tenth of it, the last included (exits.default_exit_layers)", kind="ints")
    exit_weights: list | None = setting(None, "per-exit loss weights, in the order of the exits (default: "
                                        "uniform, the paper's)", kind="floats")
    exit_schedule: str = setting("all", "which exits train each step: all (the paper), random-k (the last layer "
                                 "and k-1 others drawn from (seed, step): SortedNet) or rotate (k-1 others in turn: "
                                 "LayerSkip)", choices=SCHEDULES, resume=True)
    exit_sample_k: int = setting(0, "exits per step under random-k / rotate, the last layer included",
                                 minimum=0, resume=True)
    exit_warmup_steps: int = setting(0, "intermediate exits' loss weights ramp linearly from 0 over this many "
                                     "steps (EE-LLM)", minimum=0, resume=True)
    seq_len: int = setting(512, "tokens per row (fixed pipeline buffer shapes): records are packed into rows, or "
                           "padded", minimum=1, resume=True)
    packing: bool = setting(True, "several records per row, attention confined to each (every record gets the "
                            "loss it gets alone)", resume=True)
    train_steps: int = setting(100, "optimizer steps", minimum=1)
    train_epochs: float = setting(0.0, "when > 0: train this many passes over the training split's rows instead, "
                                  "train_steps becoming the whole steps that takes (fixed once the data is tokenized)",
                                  minimum=0.0)
    warmup_steps: int = setting(0, "linear learning-rate warm-up steps, then cosine decay", minimum=0)
    min_lr_ratio: float = setting(0.0, "the cosine decay ends at this fraction of the peak learning rate",
                                  minimum=0.0, maximum=1.0)
    activation_checkpointing: bool = setting(False, "recompute each decoder layer in backward")
    # bf16 matmuls under torch.autocast, entered by each layer (soft_ds.pipe.precision); weights,
    # gradients, optimizer, residual stream, norms and softmax stay fp32. DeepSpeed's "bf16" keeps
    # bf16 weights and activations instead.
    autocast: bool | str = setting(AUTO, "fp32 weights, matmuls in bf16 under torch.autocast; auto: on where this "
                                   "machine's bf16 matmuls are faster (native-bf16 GPUs, CPUs where a timed bf16 "
                                   "matmul wins), and the start line says why", kind="switch")
    # Measured by soft_ds.bench.overhead; exits.resolve_exit_loss says why "auto" picks what it picks.
    exit_loss: str = setting(AUTO, "how each exit's loss is computed: fused (the head's gradients in the forward "
                             "pass, chunk by chunk, no logits kept), whole (every exit's logits kept until "
                             "backward), chunked (the head recomputed in backward); auto: fused in fp32 "
                             "(autocast included), chunked under bf16", choices=EXIT_LOSS_CHOICES)
    exit_chunk_tokens: int = setting(1024, "counted tokens per chunk of the chunked and fused exit losses",
                                     minimum=0)
    val_size: int = setting(200, "held-out records for validation", minimum=0, resume=True)
    template: str = setting("alpaca", "prompt template: alpaca (Stanford Alpaca's text) or chat (the tokenizer's "
                            "chat template: the instruction is the user turn, the output the assistant's); "
                            "recorded in the checkpoint and its export", choices=TEMPLATES, resume=True,
                            exported=True)
    eval_interval: int = setting(50, "validate every N steps (0: only at the end)", minimum=0)
    eval_batches: int = setting(4, "validation micro-batches per data-parallel rank", minimum=1)
    save_interval: int = setting(0, "checkpoint every N steps (0: only at the end)", minimum=0)
    keep_checkpoints: int = setting(0, "after each save, delete all but the newest N complete checkpoints (0: keep "
                                    "every one); the one `latest` names is never deleted", minimum=0)
    log_interval: int = setting(1, "progress line and TensorBoard scalars every N steps", minimum=1)
    seed: int = setting(1234, "data order, exit sampling and random initialisation", resume=True)


@dataclass
class DeepSpeedSettings:
    """Numbers with a home in DeepSpeed's own keys (`ds_key`), which flags may override. Declared
    here for their flags and checks; their values live in the config dict (`RunConfig.ds`)."""
    micro_batch_size: int = setting(1, "rows per micro-batch per rank", minimum=1,
                                    ds_key="train_micro_batch_size_per_gpu")
    grad_accum: int = setting(1, "micro-batches per optimizer step", minimum=1, ds_key="gradient_accumulation_steps")
    lr: float = setting(0.0, "peak learning rate", ds_key="optimizer.params.lr")
    gradient_clipping: float = setting(0.0, "max gradient norm (0: off)", minimum=0.0, ds_key="gradient_clipping")
    bf16: bool = setting(False, "bf16 weights and activations, fp32 master weights and gradient accumulation "
                         "(needs ZeRO stage 1)", ds_key="bf16.enabled")
    zero_stage: int = setting(0, "ZeRO stage (pipeline parallelism allows 0 and 1)", choices=(0, 1),
                              ds_key="zero_optimization.stage")


SETTINGS = {f.name: f for f in (*dataclasses.fields(SoftOptions), *dataclasses.fields(DeepSpeedSettings))}
# The settings a resumed run must share with its checkpoint, besides checkpoint.run_shape's.
RESUME_SETTINGS = tuple(name for name, f in SETTINGS.items() if f.metadata["resume"])
# The settings an export records in its config.json, for generation and evaluation to default to.
EXPORTED_SETTINGS = tuple(name for name, f in SETTINGS.items() if f.metadata["exported"])


def export_key(name: str) -> str:
    """The config.json key under which `soft-ds export` records setting `name`."""
    return f"soft_ds_{name}"


class ConfigError(ValueError):
    """A config file, a flag or a setting's value that cannot run; the message names it."""


def ds_value(ds: dict, name: str):
    """Setting `name`'s value in a DeepSpeed config dict (its default when the dict lacks it)."""
    node = ds
    for key in SETTINGS[name].metadata["ds_key"].split("."):
        if not isinstance(node, dict) or key not in node:
            return SETTINGS[name].default
        node = node[key]
    return node


def set_ds_value(ds: dict, name: str, value) -> None:
    *path, last = SETTINGS[name].metadata["ds_key"].split(".")
    node = ds
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value


def _is_number(value, integer: bool) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if integer else isinstance(value, (int, float))


def check(name: str, value, where: str, label: str | None = None) -> None:
    """ConfigError unless `value` is one setting `name` may take; `where` says where it came from,
    `label` what it is called there (default: its name)."""
    meta = SETTINGS[name].metadata
    kind, name = meta["kind"], label or name
    ok = {"int": lambda v: _is_number(v, True), "float": lambda v: _is_number(v, False),
          "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
          "ints": lambda v: v is None or isinstance(v, list) and all(_is_number(x, True) for x in v),
          "floats": lambda v: v is None or isinstance(v, list) and all(_is_number(x, False) for x in v),
          "switch": lambda v: isinstance(v, bool) or v == AUTO}[kind](value)
    if not ok:
        raise ConfigError(f"{where}: {name} must be {KINDS[kind]}, got {value!r}")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ConfigError(f"{where}: {name} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    if meta["minimum"] is not None and value < meta["minimum"]:
        raise ConfigError(f"{where}: {name} must be >= {meta['minimum']}, got {value}")
    if meta["maximum"] is not None and value > meta["maximum"]:
        raise ConfigError(f"{where}: {name} must be <= {meta['maximum']}, got {value}")


def parse_list(text: str, flag: str, kind=int) -> list:
    """A comma-separated command-line list ("12,16,40"); ValueError naming the flag. The one parser
    of such lists: exits, exit weights, draft exits, thresholds."""
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise ValueError(f"{flag} must be comma-separated {what}, got {text!r}") from None


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _list_type(name: str, kind):
    def parse(text):
        try:
            return parse_list(text, flag(name), kind)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = "list of integers" if kind is int else "list of numbers"  # argparse's "invalid X value"
    return parse


def add_flags(parser: argparse.ArgumentParser, names=None, source: str = "the config file") -> None:
    """One flag per setting (all, or `names`), default None: `source`'s value."""
    names = list(SETTINGS) if names is None else names
    groups = {False: parser.add_argument_group(f"settings of {source}'s \"soft\" block (override it)"),
              True: parser.add_argument_group(f"DeepSpeed numbers of {source} (override it)")}
    for name in names:
        meta = SETTINGS[name].metadata
        ds_key = meta["ds_key"]
        default = SETTINGS[name].default
        where = f"file: {ds_key}" if ds_key else "" if default is None else f"default {default!r}"
        options = dict(default=None, help=meta["help"].replace("%", "%%") + (f" [{where}]" if where else ""),
                       dest=name)
        if meta["kind"] in ("bool", "switch"):
            options["action"] = argparse.BooleanOptionalAction
        elif meta["kind"] in ("ints", "floats"):
            options.update(type=_list_type(name, int if meta["kind"] == "ints" else float), metavar="N,N,...")
        else:
            options["type"] = {"int": int, "float": float, "str": str}[meta["kind"]]
            if meta["choices"]:
                options["choices"] = meta["choices"]
        groups[bool(ds_key)].add_argument(flag(name), **options)


def overrides(args: argparse.Namespace) -> dict:
    """The settings given on the command line ({name: value}), for config.override."""
    return {name: getattr(args, name) for name in SETTINGS if getattr(args, name, None) is not None}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with this project's one flag spelling (--seq-len) that also takes the underscore
    spelling (--seq_len, as in DeepSpeed's scripts, whose launcher passes --local_rank)."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([self._hyphenated(arg) for arg in args], namespace)

    def _hyphenated(self, arg: str) -> str:
        if not arg.startswith("--") or "_" not in arg.partition("=")[0]:
            return arg
        name, equals, value = arg.partition("=")
        spelled = name.replace("_", "-")
        return spelled + equals + value if spelled in self._option_string_actions else arg


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one (an unset override means "the config file's value")."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)
