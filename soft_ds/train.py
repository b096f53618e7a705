"""Sorted Fine-Tuning of a LLaMA model on a DeepSpeed pipeline.

    deepspeed --num_gpus N soft_ds/train.py --ds-config ds_configs/tiny_pp2.json [options]
    python soft_ds/train.py --ds-config ds_configs/tiny_pp2.json --pipeline-stages 1 [options]   # one process

Reads top to bottom: parse -> validate everything (before any distributed work) -> tokenizer and
data -> pipeline model -> engine -> loop (step, log, validate, save) -> per-exit summary.
A stop signal (SIGUSR1 ahead of a Slurm time limit, SIGTERM; soft_ds.preemption) ends the loop
after the step every rank agrees on: that step is saved and the exit code is 75, "stopped to be
continued with --resume" (slurm/soft.sbatch requeues the job on it).
Runs unchanged on GPUs (NCCL) and on CPU (DeepSpeed's CPU accelerator, gloo).
"""

import argparse
import functools
import math
import os
import time
from dataclasses import dataclass

import torch

from soft_ds import checkpoint
from soft_ds import config as run_config
from soft_ds import hf_io
from soft_ds import preemption
from soft_ds.data import batching, packing, records, splits
from soft_ds.data.tokenizer import BUNDLED_TOKENIZER, load_tokenizer
from soft_ds.distributed import deepspeed_environment, device_type, distributed_env, init_distributed
from soft_ds.exits import make_exits
from soft_ds.model import PRESETS, check_supported, packed_attention_kernel, preset_config, random_weights
from soft_ds.monitor import Monitor, fail
from soft_ds.partition import plan_stages
from soft_ds.precision import resolve_autocast
from soft_ds.settings import ArgumentParser, ConfigError, HelpFormatter, SoftOptions, add_flags, overrides



def parse_args(argv=None):
    p = ArgumentParser(
        description="Sorted Fine-Tuning (SoFT) of a LLaMA model on a DeepSpeed pipeline. Each setting flag "
                    "replaces the same-named value of the --ds-config file; unset, the file's value holds. "
                    "Underscore spellings (--ds_config, --seq_len) are accepted too.", formatter_class=HelpFormatter)
    p.add_argument("--ds-config", required=True, help="DeepSpeed JSON config with a 'soft' block (ds_configs/)")
    p.add_argument("--model", default="tiny",
                   help=f"Hugging Face LLaMA checkpoint directory, or a random-init preset: {sorted(PRESETS)}")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory or tokenizer.model (default: the checkpoint's, or data/tokenizer "
                        "for a preset)")
    p.add_argument("--data", default=os.path.relpath(records.BUNDLED_RECORDS),
                   help="Alpaca-format .json/.jsonl training data")
    p.add_argument("--output-dir", default=os.path.join("runs", "soft"),
                   help="checkpoints, TensorBoard events (tb/) and summary.json go here")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --output-dir (starts fresh if there is none)")
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="save and stop after this step (split a run across job allocations)")
    add_flags(p)
    p.add_argument("--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_model_source(args, tokenizer_vocab: int, seed: int):
    """(LlamaConfig, weight source) for a checkpoint directory or a random-init preset."""
    if args.model in PRESETS:
        # A preset is a shape; its vocabulary follows the tokenizer.
        model_config = preset_config(args.model, vocab_size=tokenizer_vocab)
        return model_config, random_weights(model_config, seed)
    model_config = hf_io.load_llama_config(args.model)
    return model_config, (lambda names: hf_io.load_tensors(args.model, names))


@dataclass
class PreparedRun:
    """A run checked end to end before any distributed work: what `prepare` hands the loop."""
    config: run_config.RunConfig
    tokenizer: object
    model_config: object  # transformers.LlamaConfig
    weight_source: object  # tensor names -> tensors: a checkpoint's, or a preset's random ones
    exits: list  # exits.Exit records, shallowest first
    stages: list  # partition.Stage per pipeline stage
    train_set: object  # datasets.Dataset of tokenized records
    val_set: object
    data_parallel: int
    shape: dict  # checkpoint.run_shape: what a resumed run must share with its checkpoint

    @property
    def soft(self) -> SoftOptions:
        return self.config.soft

    @functools.cached_property
    def lengths(self) -> tuple[int, ...]:
        """Each training record's token count: the rows' fill and each step's real tokens."""
        return packing.token_counts(self.train_set)

    def step_tokens(self, step: int) -> int:
        """Real tokens (padding excluded) of optimizer step `step` (0-based), so packed and padded
        runs' throughput compare."""
        s = self.soft
        return packing.step_tokens(self.lengths, step, self.config.micro_batch_size, self.config.grad_accum,
                                   self.data_parallel, s.seed, s.seq_len, s.packing)


def check_model(args, model_config, tokenizer, tokenizer_path):
    """The checkpoint holds every tensor the model needs, and the tokenizer fits its vocabulary."""
    check_supported(model_config)
    if args.model not in PRESETS:
        names = hf_io.checkpoint_tensor_names(args.model)
        missing = sorted(hf_io.expected_tensor_names(model_config, head=True) - names)
        if missing and not (missing == ["lm_head.weight"] and model_config.tie_word_embeddings):
            raise hf_io.CheckpointError(f"{args.model}: not a complete LLaMA checkpoint, missing {missing[:5]}")
    if len(tokenizer) > model_config.vocab_size:
        raise records.DataError(
            f"tokenizer {tokenizer_path} has {len(tokenizer)} tokens but the model's vocabulary is "
            f"{model_config.vocab_size}: token ids would index past the embedding; use the model's tokenizer")


def check_stages(soft, exits, stages, model_config):
    own_heads = {e.layer for e in exits if e.own_head}
    for i, stage in enumerate(stages):
        if own_heads and not own_heads & set(stage.exits):
            raise ConfigError(f"--mode ict: pipeline stage {i} (layers {stage.first_layer}-{stage.last_layer}) holds "
                              f"no exit head to train (heads at {sorted(own_heads)}); use fewer pipeline stages or "
                              f"an exit in that range")
    if soft.seq_len > model_config.max_position_embeddings:
        raise ConfigError(f"seq_len {soft.seq_len} exceeds the model's max_position_embeddings "
                          f"{model_config.max_position_embeddings}")


def build_data(args, config, tokenizer, dp: int):
    """(train set, validation set), checked to fill at least one step and one validation pass."""
    soft = config.soft
    train_set, val_set = splits.build_datasets(args.data, tokenizer, soft.seq_len, soft.val_size, soft.seed,
                                               soft.template)
    packing.global_batch_rows(len(train_set), 0, config.micro_batch_size, config.grad_accum, dp, soft.seed,
                              packing.record_lengths(train_set, soft.packing), soft.seq_len)
    val_rows = len(packing.epoch_rows(len(val_set), soft.seed, 0, packing.record_lengths(val_set, soft.packing),
                                      soft.seq_len)) if len(val_set) else 0
    if soft.val_size and val_rows < config.micro_batch_size * soft.eval_batches * dp:
        raise ConfigError(
            f"the validation split has {val_rows} usable rows (val_size {soft.val_size}, after dropping records "
            f"whose prompt fills seq_len {soft.seq_len}; packing {soft.packing}), fewer than one validation pass "
            f"needs: micro batch {config.micro_batch_size} x eval_batches {soft.eval_batches} x data parallel {dp}; "
            f"raise val_size or seq_len, lower eval_batches, or set val_size to 0")
    return train_set, val_set


def prepare(args, world_size: int) -> PreparedRun:
    """Everything that can be wrong with the input, checked before any distributed work."""
    config = run_config.override(run_config.load_config(args.ds_config), **overrides(args))
    soft = config.soft
    dp = config.data_parallel_size(world_size)
    config.deepspeed_config(world_size, cpu=True)  # checks that the batch numbers multiply out
    tokenizer_path = args.tokenizer or (BUNDLED_TOKENIZER if args.model in PRESETS else args.model)
    if args.model not in PRESETS and not os.path.isdir(args.model):
        raise hf_io.CheckpointError(f"--model {args.model!r} is neither a checkpoint directory nor a preset "
                                    f"({', '.join(sorted(PRESETS))})")
    tokenizer = load_tokenizer(tokenizer_path)
    if soft.mode == "ict" and args.model in PRESETS:
        raise ConfigError(f"--mode ict trains exit heads on a frozen fine-tuned model: --model must be a checkpoint "
                          f"directory (e.g. an SFT run exported with `soft-ds export`), not the random preset "
                          f"{args.model!r}")
    model_config, weight_source = build_model_source(args, len(tokenizer), soft.seed)
    if soft.mode == "ict":
        weight_source = hf_io.exit_heads_from_shared(weight_source)  # each head starts as the model's
    check_model(args, model_config, tokenizer, tokenizer_path)
    exits = make_exits(soft.exits, model_config.num_hidden_layers, soft.exit_weights, soft.mode)
    run_config.check_exit_schedule(soft, len(exits))  # the default exits are known only now
    stages = plan_stages(model_config, [e.layer for e in exits], soft.pipeline_stages, soft.seq_len)
    check_stages(soft, exits, stages, model_config)
    train_set, val_set = build_data(args, config, tokenizer, dp)
    if soft.train_epochs:
        rows = packing.epoch_rows(len(train_set), soft.seed, 0, packing.record_lengths(train_set, soft.packing),
                                  soft.seq_len)
        soft.train_steps = math.ceil(soft.train_epochs * len(rows) / (config.micro_batch_size * config.grad_accum * dp))
        try:
            run_config.check_config(config)
        except ConfigError as e:
            raise ConfigError(f"train_epochs {soft.train_epochs:g} makes {soft.train_steps} steps: {e}") from None
    if args.stop_at_step is not None and not 1 <= args.stop_at_step <= soft.train_steps:
        raise ConfigError(f"--stop-at-step {args.stop_at_step} outside 1..{soft.train_steps}")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    # "auto" becomes on or off here, from this machine (the start line says why).
    soft.autocast, config.autocast_reason = resolve_autocast(soft.autocast, device_type, config.bf16)
    if soft.packing:  # SOFT_PACKED_ATTENTION, if set, names a kernel this machine has
        packed_attention_kernel(device_type, config.compute_dtype)
    shape = checkpoint.run_shape(exits, soft.pipeline_stages, dp, config.micro_batch_size, config.grad_accum)
    checkpoint.check_resume(args.output_dir, args.resume, shape, soft)
    return PreparedRun(config, tokenizer, model_config, weight_source, exits, stages, train_set, val_set, dp, shape)


def data_iterator(dataset, config, engine, pad_id, start_step, eval_batches=None):
    """Micro-batches in the engine's format ((input_ids, targets, positions), targets) for this DP
    rank, packed when soft.packing (training and validation alike)."""
    soft = config.soft
    batches = batching.batch_iterator(
        dataset, config.micro_batch_size, eval_batches or config.grad_accum,
        engine.grid.get_data_parallel_rank(), engine.grid.get_data_parallel_world_size(), soft.seed,
        soft.seq_len, pad_id, start_step=start_step, packing=soft.packing)
    return (((ids, targets, positions), targets) for ids, targets, positions in batches)


class Validator:
    """Per-exit validation loss over a fixed set of held-out micro-batches, every eval_interval
    steps and after the last step."""

    def __init__(self, engine, module, prepared: PreparedRun):
        self.engine, self.module, self.prepared = engine, module, prepared

    def due(self, step: int) -> bool:
        s = self.prepared.soft
        return bool(s.val_size) and ((s.eval_interval and step % s.eval_interval == 0) or step == s.train_steps)

    def __call__(self) -> dict[int, float]:
        p = self.prepared
        self.module.meter.reset()
        batches = data_iterator(p.val_set, p.config, self.engine, p.tokenizer.pad_token_id, 0, p.soft.eval_batches)
        self.engine.eval_batch(batches, num_micro_batches=p.soft.eval_batches)
        return self.module.reduce_exit_losses()


def quiet_off_rank_zero(rank: int):
    """Data statistics and progress bars once, from rank 0."""
    import logging

    import datasets
    if rank != 0:
        datasets.disable_progress_bars()
        logging.getLogger("soft_ds").setLevel(logging.ERROR)
    else:
        logging.basicConfig(format="%(message)s")
        logging.getLogger("soft_ds").setLevel(logging.WARNING)


def main(argv=None):
    # Stop signals are noted from the first instant (one that arrives during the start-up stops
    # the run after its first step); the previous handlers come back when training returns.
    with preemption.StopRequest() as stop:
        run(argv, stop)


def run(argv, stop: preemption.StopRequest):
    """Train; on a stop signal (`stop`), save the step all ranks agree on and exit with
    preemption.EXIT_TO_BE_CONTINUED."""
    args = parse_args(argv)
    place = distributed_env()  # deepspeed, mpirun, srun or none: validation needs the world size first
    quiet_off_rank_zero(place.rank)
    try:
        environment = deepspeed_environment(place)  # how the ranks meet, checked before the long validation
        prepared = prepare(args, place.world_size)
    except (ConfigError, records.DataError, hf_io.CheckpointError, ValueError) as e:
        fail(str(e), place.rank)
    soft, exits = prepared.soft, prepared.exits

    from soft_ds.pipe import build_engine, build_pipeline
    init_distributed(environment=environment)
    torch.manual_seed(soft.seed)
    monitor = Monitor(os.path.join(args.output_dir, "tb"), torch.distributed.get_rank() == 0, soft)
    monitor.banner(prepared, place)
    module = build_pipeline(prepared.model_config, exits, soft.pipeline_stages, soft.seq_len, prepared.weight_source,
                            exit_loss=prepared.config.exit_loss, exit_chunk_tokens=soft.exit_chunk_tokens,
                            activation_checkpointing=soft.activation_checkpointing,
                            exit_schedule=prepared.config.exit_schedule(), autocast=soft.autocast)
    extra = monitor.frozen_model(module, exits)
    engine = build_engine(module, prepared.config.deepspeed_config(place.world_size, cpu=device_type() == "cpu"),
                          lr_multiplier=prepared.config.lr_multiplier)
    last_step = args.stop_at_step or soft.train_steps
    checkpointer = checkpoint.Checkpointer(args.output_dir, engine, module, prepared, stop, last_step)
    step = checkpointer.resume(args.resume, monitor)
    monitor.start(step)
    validator = Validator(engine, module, prepared)
    train_iter = data_iterator(prepared.train_set, prepared.config, engine, prepared.tokenizer.pad_token_id, step)
    train_exits, val_exits = {}, {}
    while step < last_step:
        started = time.time()
        lr = engine.get_lr()[0]  # the LR this step runs with (the scheduler steps inside train_batch)
        loss = engine.train_batch(train_iter).item()
        step += 1
        train_exits = module.reduce_exit_losses()
        if monitor.due(step, last_step):
            elapsed = time.time() - started
            monitor.train_step(step, loss, train_exits, lr, engine.get_global_grad_norm(),
                               prepared.step_tokens(step - 1) / elapsed, exits, module.shares)
        if validator.due(step):
            val_exits = validator()
            monitor.validation(step, exits, val_exits)
        if checkpointer.after_step(step, monitor):  # saved for a stop signal: the run ends here
            break
    monitor.finish(step, exits, train_exits, val_exits, os.path.join(args.output_dir, "summary.json"), extra)
    if step < last_step:
        raise SystemExit(preemption.EXIT_TO_BE_CONTINUED)


if __name__ == "__main__":
    main()
