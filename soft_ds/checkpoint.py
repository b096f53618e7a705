"""The training checkpoint: its layout, the metadata that describes it, a save that a kill at any
instant cannot break, resuming, and reading a run back for export (`soft-ds export`).

    <output_dir>/checkpoints/
        step{N}/                          one folder per saved step
            layer_XX-model_states.pt        DeepSpeed: a pipeline layer's weights (not the shared head's)
            mp_rank_XX_model_states.pt      DeepSpeed: engine state, client_state {"step": N}
            *optim_states.pt                DeepSpeed: optimizer state (ZeRO-1: one shard per replica)
            shared_head-model_states.pt     HEAD_FILE: the shared exit head, once (pipe.py writes it);
                                            a tied model's embedding is that head's, stored here only
            soft_meta.json                  META_FILE: format_version, step, the run shape (exits, pipeline
                                            and data-parallel degrees, micro-batch size, gradient
                                            accumulation), layer layout, model config, "soft" block
        latest                            the tag ("step{N}") of the newest complete checkpoint
    <output_dir>/tokenizer/               the run's tokenizer, copied into every export

`latest` is the commit point: `save` writes every rank's files, the metadata and the tokenizer
first and moves `latest` last, in one atomic rename. A kill at any instant therefore leaves
`latest` naming a complete checkpoint (or no `latest` at all before the first save completes);
a step folder it does not name is an interrupted save, which nothing reads and the next save of
that step replaces.

    soft-ds export --run runs/soft --out exported/full
    soft-ds export --run runs/soft --exit 4 --out exported/exit4

With --exit N the export is the standalone N-layer sub-model: layers[:N] -> the shared final norm
-> lm_head, whose logits equal exit N's. Both load with plain transformers (AutoModelForCausalLM /
AutoTokenizer); this package is not needed to use them. Their config.json records the run's prompt
template under "soft_ds_template" (alpaca or chat), which `soft-ds generate` and `eval` default to.
"""

import glob
import json
import os
import shutil
import sys
import tempfile
import time

import torch
import transformers

from soft_ds.hf_io import CheckpointError, hf_name, save_hf_checkpoint
from soft_ds.model import tied_embeddings
from soft_ds.preemption import EXIT_TO_BE_CONTINUED
from soft_ds.settings import EXPORTED_SETTINGS, RESUME_SETTINGS, ArgumentParser, ConfigError, export_key

# Bump when a file or a metadata field changes meaning (a key added, removed or read differently,
# the "soft" block's included). Readers take every key as this version writes it (`save`: the
# `run_shape` keys, layout, model_config and the whole "soft" block) and refuse any other version
# with a CheckpointError, rather than guess what an older one meant.
FORMAT_VERSION = 2

META_FILE = "soft_meta.json"
HEAD_FILE = "shared_head-model_states.pt"  # the shared exit head, written once per checkpoint
LATEST_FILE = "latest"  # DeepSpeed's name, so its own tools (zero_to_fp32.py) find the checkpoint too
TOKENIZER_DIR = "tokenizer"
DELETING = ".deleting-"  # a checkpoint folder's name while `prune` removes it


def checkpoint_dir(output_dir) -> str:
    return os.path.join(output_dir, "checkpoints")


def has_checkpoint(output_dir) -> bool:
    """Whether a save into `output_dir` has completed (`latest` exists)."""
    return os.path.isfile(os.path.join(checkpoint_dir(output_dir), LATEST_FILE))


def run_shape(exits, pipeline_stages: int, data_parallel: int, micro_batch_size: int, grad_accum: int) -> dict:
    """What a resumed run must share with its checkpoint; saved in the metadata under these keys."""
    return {"exits": [[e.layer, e.weight] for e in exits], "pipeline_stages": pipeline_stages,
            "data_parallel": data_parallel, "micro_batch_size": micro_batch_size, "grad_accum": grad_accum}


def check_resume(output_dir, resume: bool, shape: dict, soft=None) -> None:
    """Refuse a fresh run into a directory that holds checkpoints, and a --resume whose exits,
    parallel layout, batch (`run_shape`) or data and exit settings (settings.RESUME_SETTINGS of `soft`)
    differ from the checkpoint's. Reads, never writes."""
    if not has_checkpoint(output_dir):
        return
    if not resume:
        raise ConfigError(f"{output_dir} already holds checkpoints: pass --resume to continue "
                          f"that run, or choose another --output-dir (nothing was overwritten)")
    meta = read_checkpoint_meta(output_dir)
    compared = [(key, meta[key], value) for key, value in shape.items()]
    if soft is not None:
        compared += [(key, meta["soft"][key], getattr(soft, key)) for key in RESUME_SETTINGS]
    for key, saved, value in compared:
        if saved != value:
            raise ConfigError(f"--resume: checkpoint in {checkpoint_dir(output_dir)} has {key}={saved}, "
                              f"this run has {value} (a resumed run keeps the exits, layout, batch and data "
                              f"order of its checkpoint; start a new --output-dir to change them)")


def save(engine, output_dir, step: int, tokenizer, *, shape: dict, layout, model_config, soft) -> str:
    """Save step `step` (every rank calls this); returns the checkpoints directory.

    Order, so that a kill at any instant leaves the previous checkpoint the one `latest` names:
    every rank's DeepSpeed files, then (rank 0) the metadata and the tokenizer, a barrier, and
    last (rank 0) `latest` replaced in one rename.
    """
    ckpt = checkpoint_dir(output_dir)
    tag = f"step{step}"
    folder = os.path.join(ckpt, tag)
    rank0 = engine.global_rank == 0
    if rank0 and os.path.isdir(folder):
        # An interrupted save of this step (`latest` never names a step the run has not passed
        # yet): start it clean, so none of its files can pass for this save's.
        shutil.rmtree(folder)
    torch.distributed.barrier()  # nobody writes into the folder while it is being removed
    engine.save_checkpoint(ckpt, tag=tag, client_state={"step": step}, save_latest=False)
    if rank0:
        meta = {"format_version": FORMAT_VERSION, "step": step, **shape, "layout": layout,
                "model_config": model_config.to_dict(), "soft": vars(soft)}
        _write_atomically(os.path.join(folder, META_FILE), json.dumps(meta, indent=2))
        _save_tokenizer(tokenizer, output_dir)
    torch.distributed.barrier()  # every rank's files are complete before `latest` names them
    if rank0:
        _write_atomically(os.path.join(ckpt, LATEST_FILE), tag)
    return ckpt


class Checkpointer:
    """Saves a run every soft.save_interval steps, after its last step, and after the step at which
    a stop signal is agreed (`stop`: preemption.StopRequest); resumes it."""

    def __init__(self, output_dir, engine, module, run, stop, last_step: int):
        self.output_dir, self.engine, self.module, self.run = output_dir, engine, module, run
        self.stop, self.last_step = stop, last_step

    def resume(self, requested: bool, monitor) -> int:
        """The step to start from: the latest checkpoint's when `requested` and there is one, else 0."""
        if requested and has_checkpoint(self.output_dir):
            step = load(self.engine, self.output_dir)
            monitor.info(f"resumed from step {step}")
            return step
        if requested:
            monitor.info(f"--resume: no checkpoint in {checkpoint_dir(self.output_dir)}, starting fresh")
        return 0

    def after_step(self, step: int, monitor) -> bool:
        """Save if step `step` is due; True when a stop signal was agreed (the run ends here)."""
        stopping = self.stop.agreed(self.engine.device)  # every rank stops after the same step
        if stopping and step < self.last_step:
            monitor.info(f"stop requested ({self.stop.received or 'signal on another rank'}): saving step {step}, "
                         f"then exiting with {EXIT_TO_BE_CONTINUED} (to be continued)")
        interval = self.run.soft.save_interval
        if (interval and step % interval == 0) or step == self.last_step or stopping:
            saving = time.time()
            saved = save(self.engine, self.output_dir, step, self.run.tokenizer, shape=self.run.shape,
                         layout=self.module.layout, model_config=self.run.model_config, soft=self.run.soft)
            monitor.info(f"saved checkpoint step {step} to {saved} ({time.time() - saving:.1f} s)")
            if self.run.soft.keep_checkpoints and self.engine.global_rank == 0:
                for deleted in prune(self.output_dir, self.run.soft.keep_checkpoints):
                    monitor.info(f"deleted checkpoint {deleted} (keep_checkpoints {self.run.soft.keep_checkpoints})")
        return stopping


def prune(output_dir, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints (complete: metadata written, and not
    newer than the one `latest` names); the one `latest` names is always kept. Returns the tags
    deleted. Each goes in two moves, so that a kill at any instant leaves a resumable run and no
    folder that passes for a checkpoint: renamed to a `.deleting-` name (one atomic rename: gone
    as a checkpoint), then removed; what a killed removal left is removed by the next call."""
    ckpt = checkpoint_dir(output_dir)
    for leftover in glob.glob(os.path.join(ckpt, f"{DELETING}*")):
        shutil.rmtree(leftover)
    latest = _step_of(_latest_tag(output_dir))
    complete = sorted(step for step in map(_step_of, os.listdir(ckpt)) if step is not None and step <= latest
                      and os.path.isfile(os.path.join(ckpt, f"step{step}", META_FILE)))
    doomed = [step for step in complete[:-keep] if step != latest]
    for step in doomed:
        trash = os.path.join(ckpt, f"{DELETING}step{step}")
        os.rename(os.path.join(ckpt, f"step{step}"), trash)
        shutil.rmtree(trash)
    return [f"step{step}" for step in doomed]


def _step_of(tag: str) -> int | None:
    """The step of a checkpoint folder's name ("step12" -> 12); None for any other name."""
    return int(tag[4:]) if tag.startswith("step") and tag[4:].isdigit() else None


def load(engine, output_dir) -> int:
    """Load the checkpoint `latest` names into the engine (every rank calls this); its step."""
    ckpt = checkpoint_dir(output_dir)
    _, client_state = engine.load_checkpoint(ckpt, tag=_latest_tag(output_dir))
    return client_state["step"]


def _write_atomically(path, text: str) -> None:
    """Replace `path` by a file holding `text`; a reader sees the old file or the new one, never a
    part: write a temporary file beside it, flush it to disk, rename it over `path`, and flush the
    directory so the rename itself is on disk."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    directory = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _save_tokenizer(tokenizer, output_dir) -> None:
    """The run's tokenizer, written once, built beside its place and renamed into it (a kill
    mid-write must not leave a partial tokenizer that later saves would take as done)."""
    target = os.path.join(output_dir, TOKENIZER_DIR)
    if os.path.isdir(target):
        return
    staging = tempfile.mkdtemp(prefix=f".{TOKENIZER_DIR}.tmp-", dir=output_dir)
    os.chmod(staging, 0o755)  # mkdtemp makes it private (0o700); the run's files should be readable
    tokenizer.save_pretrained(staging)
    os.rename(staging, target)


# --------------------------------------------------------------------------------------------
# Reading a run
# --------------------------------------------------------------------------------------------


def _latest_tag(run_dir) -> str:
    latest = os.path.join(checkpoint_dir(run_dir), LATEST_FILE)
    if not os.path.isfile(latest):
        raise CheckpointError(f"{run_dir}: no soft-ds checkpoint ({latest} missing)")
    with open(latest) as f:
        return f.read().strip()


def _step_folder(run_dir, step=None) -> str:
    """The folder of checkpoint `step`, or of the one `latest` names."""
    ckpt = checkpoint_dir(run_dir)
    tag = _latest_tag(run_dir) if step is None else f"step{step}"
    folder = os.path.join(ckpt, tag)
    if not os.path.isdir(folder):
        steps = (os.path.basename(p).removeprefix("step") for p in glob.glob(os.path.join(ckpt, "step*")))
        have = [f"step{n}" for n in sorted(int(n) for n in steps if n.isdigit())]
        raise CheckpointError(f"{run_dir}: checkpoint {tag} not found (have: {have})")
    return folder


def read_checkpoint_meta(run_dir, step=None) -> dict:
    """The metadata a training checkpoint was saved with (the latest unless step is given)."""
    return _read_meta(_step_folder(run_dir, step))


def _read_meta(folder) -> dict:
    path = os.path.join(folder, META_FILE)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({e}); was the save interrupted?") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        found = "no format_version" if version is None else f"format_version {version!r}"
        raise CheckpointError(f"{path} has {found}; this soft-ds reads format_version {FORMAT_VERSION} only. "
                              f"Export the run with the soft-ds that saved it (soft-ds export) and train "
                              f"(--model) or evaluate from the export, or start a new run")
    return meta


def read_training_checkpoint(run_dir, step=None):
    """(HF state dict, LlamaConfig, meta) of a run's checkpoint (the latest unless step is given)."""
    folder = _step_folder(run_dir, step)
    meta = _read_meta(folder)
    config = transformers.LlamaConfig.from_dict(meta["model_config"])
    state = {}
    for index, (kind, number) in enumerate(meta["layout"]):
        if kind == "exit" or (kind == "embed" and tied_embeddings(config)):
            continue  # the shared head (with a tied model's embedding) is saved once, in HEAD_FILE
        files = glob.glob(os.path.join(folder, f"layer_{index:02d}-*model_states.pt"))
        if len(files) != 1:
            raise CheckpointError(f"{folder}: expected one file for layer {index} ({kind} {number}), found {files}")
        for local, tensor in torch.load(files[0], map_location="cpu", weights_only=True).items():
            state[hf_name(kind, number, local)] = tensor
    for local, tensor in torch.load(os.path.join(folder, HEAD_FILE), map_location="cpu", weights_only=True).items():
        state[hf_name("exit", 0, local)] = tensor
    return state, config, meta


def main(argv=None):
    """`soft-ds export`: a training checkpoint as a Hugging Face LlamaForCausalLM directory."""
    p = ArgumentParser(description="Export a soft-ds training checkpoint as a Hugging Face "
                                            "LlamaForCausalLM directory (the full model, or exit N's sub-model).")
    p.add_argument("--run", required=True, help="the training --output-dir (holds checkpoints/ and tokenizer/)")
    p.add_argument("--out", required=True, help="directory to write (must not exist or be empty)")
    p.add_argument("--exit", type=int, default=None, help="export the N-layer sub-model of exit N")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    state, config, meta = read_training_checkpoint(args.run, args.step)
    exits = [layer for layer, _ in meta["exits"]]
    if args.exit is not None and args.exit not in exits:
        print(f"note: layer {args.exit} was not a training exit (exits: {exits})", file=sys.stderr)
    # What the model should be used with, e.g. the prompt template training used, for `soft-ds
    # generate` and `eval` to default to (data.templates.checkpoint_template).
    for name in EXPORTED_SETTINGS:
        setattr(config, export_key(name), meta["soft"][name])
    out = save_hf_checkpoint(state, config, args.out, tokenizer_dir=os.path.join(args.run, TOKENIZER_DIR),
                             exit_layer=args.exit, overwrite=args.overwrite)
    what = f"exit {args.exit} ({args.exit} layers)" if args.exit else f"full model ({config.num_hidden_layers} layers)"
    print(f"exported {what} from step {meta['step']} of {args.run} to {out}")
