"""What every evaluation reads, checked before anything runs: exported checkpoints given as NAME=DIR
with their configs, exits and tokenizers, and the held-out records training set aside.

    checkpoint = open_checkpoint("soft", "runs/soft/hf-full", exits="2,4,6,8")
    checkpoint.exits, checkpoint.tokenizer, checkpoint.template, checkpoint.load(torch.float32, "cpu")

Only configs and tokenizers are read here; the weights are loaded by `Checkpoint.load`, one model
at a time. Every problem is a ValueError (CheckpointError, DataError) whose message names it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig

from soft_ds.settings import parse_list
from soft_ds.data.templates import check_template, checkpoint_template
from soft_ds.exits import check_exit_layers, default_exit_layers
from soft_ds.hf_io import load_llama_config, load_model
from soft_ds.inference import checkpoint_tokenizer
from soft_ds.model import Llama


@dataclass(frozen=True)
class Checkpoint:
    """An exported checkpoint to evaluate: its name in the reports, where it is, and its exits."""
    name: str
    path: Path
    config: LlamaConfig
    exits: tuple[int, ...]  # sorted, each in 1..num_layers
    tokenizer: object  # a transformers tokenizer
    template: str  # the prompt template (settings.TEMPLATES) its prompts and records are written in

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def load(self, dtype: torch.dtype, device: str | torch.device) -> Llama:
        return load_model(self.path, dtype=dtype, device=device)


def parse_spec(spec: str, flag: str = "--model") -> tuple[str, Path]:
    """NAME=DIR -> (NAME, DIR); a bare DIR is named after its folder."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec).name, spec
    if not name.strip() or not path.strip():
        raise ValueError(f"{flag} {spec!r}: expected NAME=DIR")
    return name.strip(), Path(path)


def parse_specs(specs: list[str], flag: str = "--model") -> dict[str, Path]:
    """Several NAME=DIR, each name once: {name: directory}."""
    models = {}
    for spec in specs:
        name, path = parse_spec(spec, flag)
        if name in models:
            raise ValueError(f"{flag}: the name {name!r} is given twice; name each model (NAME=DIR)")
        models[name] = path
    return models


def parse_exits(text: str | None, num_layers: int, what: str, flag: str = "--exits",
                last_by_default: bool = False) -> tuple[int, ...]:
    """Exits as written on the command line: 'all', comma-separated layers, or None for the default:
    the training default of the depth (exits.default_exit_layers), or the last layer alone."""
    if text is None:
        return (num_layers,) if last_by_default else default_exit_layers(num_layers)
    if text.strip() == "all":
        return tuple(range(1, num_layers + 1))
    layers = parse_list(text, flag)
    try:
        return check_exit_layers(layers, num_layers, what)
    except ValueError as error:
        raise ValueError(f"{flag} {text}: {error}") from None


def open_checkpoint(name: str, path: str | os.PathLike, exits: str | None = None, tokenizer=None,
                    last_by_default: bool = False, what: str | None = None, flag: str = "--exits",
                    template: str | None = None) -> Checkpoint:
    """A checkpoint's config, exits (`parse_exits` of `exits`), tokenizer (`tokenizer` if given,
    else the one saved beside the weights) and prompt template (`template` if given, else the one
    its export records: data.templates.checkpoint_template); `what` names it in errors (default: its name)."""
    path = Path(path)
    config = load_llama_config(path)
    layers = parse_exits(exits, config.num_hidden_layers, what or name, flag, last_by_default)
    tokenizer = tokenizer if tokenizer is not None else checkpoint_tokenizer(path)
    if tokenizer is None:
        raise ValueError(f"{name} ({path}) holds no tokenizer; pass --tokenizer")
    template = check_template(checkpoint_template(path, template), tokenizer)
    return Checkpoint(name, path, config, layers, tokenizer, template)


def shared_tokenizer(checkpoints: list[Checkpoint]):
    """The tokenizer every checkpoint's data is encoded with; they must agree on it, or their losses
    would be over different tokens, and it must fit every model's vocabulary."""
    first = checkpoints[0]
    for checkpoint in checkpoints:
        if checkpoint.tokenizer.get_vocab() != first.tokenizer.get_vocab():
            raise ValueError(f"{checkpoint.name} and {first.name} have different tokenizers: their per-token "
                             "losses are not comparable (pass one --tokenizer if they really share a vocabulary)")
        if len(checkpoint.tokenizer) > checkpoint.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(checkpoint.tokenizer)} tokens but {checkpoint.name}'s "
                             f"vocabulary is {checkpoint.config.vocab_size}: tokenizer and model do not match")
    return first.tokenizer


def shared_template(checkpoints: list[Checkpoint]) -> str:
    """The template the held-out records are written in for every checkpoint: one, or their losses
    would be over different texts."""
    templates = {checkpoint.name: checkpoint.template for checkpoint in checkpoints}
    if len(set(templates.values())) > 1:
        raise ValueError(f"the models were trained with different prompt templates ({templates}); pass one "
                         "--template to score them on the same text")
    return checkpoints[0].template


def held_out_records(data: str | os.PathLike, tokenizer, max_length: int, val_size: int, seed: int,
                     template: str = "alpaca"):
    """The validation split of `data.splits.build_datasets`: the same data, val_size, seed and
    template as training give the very records training held out, tokenized and cut the same way."""
    # Imported here: of the eval commands only lm, kl and answers read a training file, so only
    # they import `datasets` (judge, triviaqa on JSON, and claims start without it).
    from soft_ds.data.splits import build_datasets

    if val_size < 1:
        raise ValueError(f"--val-size must be at least 1 to have held-out records, got {val_size}")
    _, val_set = build_datasets(data, tokenizer, max_length, val_size, seed, template)
    if len(val_set) == 0:
        raise ValueError(f"{data}: no held-out record has a response within --seq-len {max_length}")
    return val_set
