"""Sorted Fine-Tuning of a LLaMA model on a DeepSpeed pipeline.

    deepspeed --num_gpus N soft_ds/train.py --ds_config ds_configs/tiny_pp2.json [options]
    python soft_ds/train.py --ds_config ds_configs/tiny_pp2.json --pipeline_stages 1 [options]   # one process

Reads top to bottom: parse -> validate everything (before any distributed work) -> tokenizer and
data -> pipeline model -> engine -> loop (step, log, validate, save) -> per-exit summary.
A stop signal (SIGUSR1 ahead of a Slurm time limit, SIGTERM; soft_ds.preemption) ends the loop
after the step every rank agrees on: that step is saved and the exit code is 75, "stopped to be
continued with --resume" (slurm/soft.sbatch requeues the job on it).
Runs unchanged on GPUs (NCCL) and on CPU (DeepSpeed's CPU accelerator, gloo).
"""

import argparse
import os
import time

import torch
import transformers

from soft_ds import checkpoint
from soft_ds import config as run_config
from soft_ds import data as soft_data
from soft_ds import hf_io
from soft_ds import preemption
from soft_ds.cli import parse_list
from soft_ds.distributed import deepspeed_environment, distributed_env, init_distributed
from soft_ds.exits import EXIT_LOSS_CHOICES, make_exits
from soft_ds.model import PRESETS, check_supported, packed_attention_kernel, preset_config, random_weights
from soft_ds.monitor import Monitor, error
from soft_ds.partition import balance_ratio, plan_stages
from soft_ds.precision import resolve_autocast



class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one: an unset override means "the config file's value"."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Sorted Fine-Tuning (SoFT) of a LLaMA model on a DeepSpeed pipeline. The override "
                    "options replace the same-named values of the --ds_config file; unset, the file's "
                    "value holds.", formatter_class=HelpFormatter)
    p.add_argument("--ds_config", required=True, help="DeepSpeed JSON config with a 'soft' block (ds_configs/)")
    p.add_argument("--model", default="tiny",
                   help=f"Hugging Face LLaMA checkpoint directory, or a random-init preset: {sorted(PRESETS)}")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory or tokenizer.model (default: the checkpoint's, or data/tokenizer "
                        "for a preset)")
    p.add_argument("--data", default=os.path.relpath(soft_data.BUNDLED_RECORDS),
                   help="Alpaca-format .json/.jsonl training data")
    p.add_argument("--output_dir", default=os.path.join("runs", "soft"),
                   help="checkpoints, TensorBoard events (tb/) and summary.json go here")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --output_dir (starts fresh if there is none)")
    p.add_argument("--stop_at_step", type=int, default=None,
                   help="save and stop after this step (split a run across job allocations)")
    o = p.add_argument_group("overrides of the config file's 'soft' block")
    o.add_argument("--mode", choices=["soft", "sft", "ict"], default=None,
                   help="soft: loss at every exit (shared head); sft: last layer only; ict: the SFT+ICT baseline, "
                        "a separate head per exit trained on the frozen --model (an SFT checkpoint)")
    o.add_argument("--exits", default=None, help="comma-separated exit layers, e.g. 12,16,20,24,28,32,36,40")
    o.add_argument("--exit_weights", default=None, help="comma-separated per-exit loss weights (default uniform)")
    o.add_argument("--exit_schedule", choices=run_config.SCHEDULES, default=None,
                   help="which exits train each step: all (the paper), random-k (the last layer and k-1 others "
                        "drawn per step from the seed: SortedNet) or rotate (k-1 others in turn: LayerSkip)")
    o.add_argument("--exit_sample_k", type=int, default=None,
                   help="exits per step under random-k / rotate, the last layer included")
    o.add_argument("--exit_warmup_steps", type=int, default=None,
                   help="intermediate exits' loss weights ramp linearly from 0 over this many steps (EE-LLM)")
    o.add_argument("--pipeline_stages", type=int, default=None, help="pipeline degree")
    o.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (padded/truncated)")
    o.add_argument("--template", choices=run_config.TEMPLATES, default=None,
                   help="prompt template: alpaca (Stanford Alpaca's text; the file's default) or chat (the "
                        "tokenizer's chat template: the instruction is the user turn, the output the assistant's); "
                        "recorded in the checkpoint and its export")
    o.add_argument("--train_steps", type=int, default=None, help="optimizer steps")
    o.add_argument("--warmup_steps", type=int, default=None, help="linear warm-up steps before cosine decay")
    o.add_argument("--val_size", type=int, default=None, help="held-out validation records")
    o.add_argument("--eval_interval", type=int, default=None, help="validate every N steps (0: at the end)")
    o.add_argument("--save_interval", type=int, default=None, help="checkpoint every N steps (0: at the end)")
    o.add_argument("--log_interval", type=int, default=None, help="progress line every N steps")
    o.add_argument("--seed", type=int, default=None, help="data order and random initialisation")
    o.add_argument("--activation_checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute decoder layers in backward")
    o.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="several records per row, attention confined to each")
    o.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=None,
                   help="fp32 weights, matmuls in bf16 under torch.autocast: on a CPU with bf16 instructions "
                        "about 1.4x fp32's speed, at per-step losses within 1%% of fp32's")
    o.add_argument("--exit_loss", choices=EXIT_LOSS_CHOICES, default=None,
                   help="how each exit's loss is computed: fused (gradients in the forward pass), whole, chunked; "
                        "auto: fused in fp32 (autocast included), chunked under bf16")
    d = p.add_argument_group("overrides of the config file's DeepSpeed numbers")
    d.add_argument("--micro_batch_size", type=int, default=None, help="train_micro_batch_size_per_gpu")
    d.add_argument("--grad_accum", type=int, default=None, help="gradient_accumulation_steps")
    d.add_argument("--lr", type=float, default=None, help="peak learning rate (optimizer.params.lr)")
    d.add_argument("--gradient_clipping", type=float, default=None, help="max gradient norm (0: off)")
    d.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 weights and activations, fp32 master weights (DeepSpeed's bf16 block)")
    d.add_argument("--zero_stage", type=int, choices=[0, 1], default=None, help="ZeRO stage")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_run_config(args) -> run_config.RunConfig:
    config = run_config.load_config(args.ds_config)
    exits = None if args.exits is None else parse_list(args.exits, "--exits")
    weights = None if args.exit_weights is None else parse_list(args.exit_weights, "--exit_weights", float)
    return run_config.override(
        config, mode=args.mode, exits=exits, exit_weights=weights, exit_schedule=args.exit_schedule,
        exit_sample_k=args.exit_sample_k, exit_warmup_steps=args.exit_warmup_steps,
        pipeline_stages=args.pipeline_stages, seq_len=args.seq_len, template=args.template,
        train_steps=args.train_steps,
        warmup_steps=args.warmup_steps, val_size=args.val_size, eval_interval=args.eval_interval,
        save_interval=args.save_interval, log_interval=args.log_interval, seed=args.seed,
        activation_checkpointing=args.activation_checkpointing, autocast=args.autocast, packing=args.packing,
        exit_loss=args.exit_loss,
        micro_batch_size=args.micro_batch_size, grad_accum=args.grad_accum, lr=args.lr,
        gradient_clipping=args.gradient_clipping, bf16=args.bf16, zero_stage=args.zero_stage)


def build_model_source(args, tokenizer_vocab: int, seed: int):
    """(LlamaConfig, weight source) for a checkpoint directory or a random-init preset."""
    if args.model in PRESETS:
        # A preset is a shape; its vocabulary follows the tokenizer.
        model_config = preset_config(args.model, vocab_size=tokenizer_vocab)
        return model_config, random_weights(model_config, seed)
    model_config = hf_io.load_llama_config(args.model)
    return model_config, (lambda names: hf_io.load_tensors(args.model, names))


def validate_and_prepare(args, world_size: int):
    """Everything that can be wrong with the input, checked before any distributed work."""
    config = build_run_config(args)
    soft = config.soft
    dp = config.data_parallel_size(world_size)
    config.deepspeed_config(world_size, cpu=True)  # checks that the batch numbers multiply out
    if args.stop_at_step is not None and not 1 <= args.stop_at_step <= soft.train_steps:
        raise run_config.ConfigError(f"--stop_at_step {args.stop_at_step} outside 1..{soft.train_steps}")
    tokenizer_path = args.tokenizer or (soft_data.BUNDLED_TOKENIZER if args.model in PRESETS else args.model)
    if args.model not in PRESETS and not os.path.isdir(args.model):
        raise hf_io.CheckpointError(f"--model {args.model!r} is neither a checkpoint directory nor a preset "
                                    f"({', '.join(sorted(PRESETS))})")
    tokenizer = soft_data.load_tokenizer(tokenizer_path)
    if soft.mode == "ict" and args.model in PRESETS:
        raise run_config.ConfigError(f"--mode ict trains exit heads on a frozen fine-tuned model: --model must be a "
                                     f"checkpoint directory (e.g. an SFT run exported with `soft-ds export`), "
                                     f"not the random preset {args.model!r}")
    model_config, weight_source = build_model_source(args, len(tokenizer), soft.seed)
    if soft.mode == "ict":
        weight_source = hf_io.exit_heads_from_shared(weight_source)  # each head starts as the model's
    check_supported(model_config)
    if args.model not in PRESETS:
        names = hf_io.checkpoint_tensor_names(args.model)
        missing = sorted(hf_io.expected_tensor_names(model_config, head=True) - names)
        if missing and not (missing == ["lm_head.weight"] and model_config.tie_word_embeddings):
            raise hf_io.CheckpointError(f"{args.model}: not a complete LLaMA checkpoint, missing {missing[:5]}")
    if len(tokenizer) > model_config.vocab_size:
        raise soft_data.DataError(
            f"tokenizer {tokenizer_path} has {len(tokenizer)} tokens but the model's vocabulary is "
            f"{model_config.vocab_size}: token ids would index past the embedding; use the model's tokenizer")
    exits = make_exits(soft.exits, model_config.num_hidden_layers, soft.exit_weights, soft.mode)
    run_config.validate_exit_schedule(soft, len(exits))  # the default exits are known only now
    stages = plan_stages(model_config, [e.layer for e in exits], soft.pipeline_stages, soft.seq_len)
    own_heads = {e.layer for e in exits if e.own_head}
    for i, stage in enumerate(stages):
        if own_heads and not own_heads & set(stage.exits):
            raise run_config.ConfigError(
                f"--mode ict: pipeline stage {i} (layers {stage.first_layer}-{stage.last_layer}) holds no exit head "
                f"to train (heads at {sorted(own_heads)}); use fewer pipeline_stages or an exit in that range")
    if soft.seq_len > model_config.max_position_embeddings:
        raise run_config.ConfigError(f"seq_len {soft.seq_len} exceeds the model's max_position_embeddings "
                                     f"{model_config.max_position_embeddings}")
    train_set, val_set = soft_data.build_datasets(args.data, tokenizer, soft.seq_len, soft.val_size, soft.seed,
                                                  soft.template)
    soft_data.global_batch_rows(len(train_set), 0, config.micro_batch_size, config.grad_accum, dp, soft.seed,
                                soft_data.record_lengths(train_set, soft.packing), soft.seq_len)
    val_rows = len(soft_data.epoch_rows(len(val_set), soft.seed, 0, soft_data.record_lengths(val_set, soft.packing),
                                        soft.seq_len)) if len(val_set) else 0
    if soft.val_size and val_rows < config.micro_batch_size * soft.eval_batches * dp:
        raise run_config.ConfigError(
            f"the validation split has {val_rows} usable rows (val_size {soft.val_size}, after dropping records "
            f"whose prompt fills seq_len {soft.seq_len}; packing {soft.packing}), fewer than one validation pass "
            f"needs: micro batch {config.micro_batch_size} x eval_batches {soft.eval_batches} x data parallel {dp}; "
            f"raise val_size or seq_len, lower eval_batches, or set val_size to 0")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    # "auto" becomes on or off here, from this machine (the start line says why).
    soft.autocast, config.autocast_reason = resolve_autocast(soft.autocast, device_type, config.bf16)
    if soft.packing:  # SOFT_PACKED_ATTENTION, if set, names a kernel this machine has
        packed_attention_kernel(device_type, config.compute_dtype)
    shape = checkpoint.run_shape(exits, soft.pipeline_stages, dp, config.micro_batch_size, config.grad_accum)
    checkpoint.check_resume(args.output_dir, args.resume, shape, soft)
    return config, tokenizer, model_config, weight_source, exits, stages, train_set, val_set


def data_iterator(dataset, config, engine, pad_id, start_step, eval_batches=None):
    """Micro-batches in the engine's format ((input_ids, targets, positions), targets) for this DP
    rank, packed when soft.packing (training and validation alike)."""
    soft = config.soft
    batches = soft_data.batch_iterator(
        dataset, config.micro_batch_size, eval_batches or config.grad_accum,
        engine.grid.get_data_parallel_rank(), engine.grid.get_data_parallel_world_size(), soft.seed,
        soft.seq_len, pad_id, start_step=start_step, packing=soft.packing)
    return (((ids, targets, positions), targets) for ids, targets, positions in batches)


def validate(engine, module, val_set, config, pad_id):
    """Per-exit validation loss over a fixed set of held-out micro-batches."""
    module.meter.reset()
    engine.eval_batch(data_iterator(val_set, config, engine, pad_id, 0, config.soft.eval_batches),
                      num_micro_batches=config.soft.eval_batches)
    return module.reduce_exit_losses()


def device_line(place) -> str:
    """Where this rank computes, for the start line: its CUDA device and how it was mapped."""
    if not torch.cuda.is_available():
        return "CPU"
    index = torch.cuda.current_device()
    return (f"rank 0 on cuda:{index} ({torch.cuda.get_device_name(index)}) of {torch.cuda.device_count()} visible "
            f"to it (local rank {place.local_rank})")


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
    rank, world_size = place.rank, place.world_size
    quiet_off_rank_zero(rank)
    try:
        environment = deepspeed_environment(place)  # how the ranks meet, checked before the long validation
        (config, tokenizer, model_config, weight_source, exits, stages, train_set,
         val_set) = validate_and_prepare(args, world_size)
    except (run_config.ConfigError, soft_data.DataError, hf_io.CheckpointError, ValueError) as e:
        raise error(str(e), rank) from None
    soft = config.soft

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from soft_ds.pipe import build_engine, build_pipeline

    init_distributed(environment=environment)
    torch.manual_seed(soft.seed)
    cpu = get_accelerator().device_name() == "cpu"
    monitor_enabled = torch.distributed.get_rank() == 0
    resume = args.resume and checkpoint.has_checkpoint(args.output_dir)
    monitor = Monitor(os.path.join(args.output_dir, "tb"), monitor_enabled, soft.train_steps)
    schedule = "" if soft.exit_schedule == "all" else f" ({soft.exit_schedule}, k={soft.exit_sample_k})"
    schedule += f" (warm-up {soft.exit_warmup_steps} steps)" if soft.exit_warmup_steps else ""
    monitor.info(f"SoFT ({soft.mode}) | exits {[e.layer for e in exits]}{schedule} | {config.exit_loss} exit loss | "
                 f"{soft.pipeline_stages} stages x "
                 f"{config.data_parallel_size(world_size)} data parallel | train batch "
                 f"{config.train_batch_size(world_size)} | {len(train_set)} train / {len(val_set)} val records")
    monitor.info(f"  {place.launcher}, world size {world_size} | {device_line(place)} | torch {torch.__version__}, "
                 f"deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")
    monitor.info(f"  precision: {config.precision} | {config.autocast_reason}")
    lengths = soft_data.token_counts(train_set)  # for the rows' fill and each step's real tokens
    rows, fill = soft_data.row_fill(lengths, soft.seed, soft.seq_len, soft.packing)
    kernel = packed_attention_kernel(get_accelerator().device_name(), config.compute_dtype)
    monitor.info(f"  {'packed' if soft.packing else 'padded'} rows of {soft.seq_len} tokens: {len(train_set)} train "
                 f"records in {rows} rows per epoch, {fill:.0%} of their positions real tokens"
                 + (f"; packed attention: {kernel}" if soft.packing else ""))
    for i, stage in enumerate(stages):
        monitor.info(f"  stage {i}: layers {stage.first_layer}-{stage.last_layer}, exits {list(stage.exits)}")
    monitor.info(f"  stage balance (slowest / mean cost): {balance_ratio(stages):.3f}")
    extra = {}

    module = build_pipeline(model_config, exits, soft.pipeline_stages, soft.seq_len, weight_source,
                            exit_loss=config.exit_loss, exit_chunk_tokens=soft.exit_chunk_tokens,
                            activation_checkpointing=soft.activation_checkpointing,
                            exit_schedule=config.exit_schedule(), autocast=soft.autocast)
    if module.frozen_base:
        extra["extra_parameters"] = module.extra_parameters()
        monitor.info(f"  SFT+ICT: the model is frozen; {sum(e.own_head for e in exits)} exit heads train, "
                     f"{extra['extra_parameters']:,} parameters beyond the model's")
    engine = build_engine(module, config.deepspeed_config(world_size, cpu), lr_multiplier=config.lr_multiplier)

    step = 0
    if resume:
        step = checkpoint.load(engine, args.output_dir)
        monitor.info(f"resumed from step {step}")
    elif args.resume:
        monitor.info(f"--resume: no checkpoint in {checkpoint.checkpoint_dir(args.output_dir)}, starting fresh")
    monitor.start(step)

    train_iter = data_iterator(train_set, config, engine, tokenizer.pad_token_id, start_step=step)
    dp = config.data_parallel_size(world_size)
    last_step = args.stop_at_step or soft.train_steps
    train_exits, val_exits = {}, {}
    scheduled = soft.exit_schedule != "all" or soft.exit_warmup_steps > 0  # the exits' shares vary by step
    while step < last_step:
        started = time.time()
        lr = engine.get_lr()[0]  # the LR this step runs with (the scheduler steps inside train_batch)
        loss = engine.train_batch(train_iter).item()
        step += 1
        train_exits = module.reduce_exit_losses()
        if step % soft.log_interval == 0 or step == last_step:
            elapsed = time.time() - started
            # real tokens (padding excluded), so packed and padded runs compare
            tokens_per_s = soft_data.step_tokens(lengths, step - 1, config.micro_batch_size, config.grad_accum, dp,
                                                 soft.seed, soft.seq_len, soft.packing) / elapsed
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else None
            monitor.scalars("train", step, loss, train_exits, lr=lr, grad_norm=grad_norm,
                            tokens_per_s=tokens_per_s)
            monitor.exit_shares(step, exits, module.shares)
            monitor.progress(step, loss, train_exits, lr, grad_norm, tokens_per_s,
                             shares=module.shares if scheduled else None)
        final = step == soft.train_steps
        if soft.val_size and ((soft.eval_interval and step % soft.eval_interval == 0) or final):
            val_exits = validate(engine, module, val_set, config, tokenizer.pad_token_id)
            val_loss = sum(val_exits[e.layer] * e.weight for e in exits) / sum(e.weight for e in exits)
            monitor.scalars("val", step, val_loss, val_exits)
            monitor.info(f"validation at step {step}: " +
                         " ".join(f"exit {n}: {v:.4f}" for n, v in val_exits.items()))
        stopping = stop.agreed(engine.device)  # every rank stops after the same step
        if stopping and step < last_step:
            monitor.info(f"stop requested ({stop.received or 'signal on another rank'}): saving step {step}, "
                         f"then exiting with {preemption.EXIT_TO_BE_CONTINUED} (to be continued)")
        if (soft.save_interval and step % soft.save_interval == 0) or step == last_step or stopping:
            saving = time.time()
            shape = checkpoint.run_shape(exits, soft.pipeline_stages, config.data_parallel_size(world_size),
                                         config.micro_batch_size, config.grad_accum)
            saved = checkpoint.save(engine, args.output_dir, step, tokenizer, shape=shape, layout=module.layout,
                                    model_config=model_config, soft=soft)
            monitor.info(f"saved checkpoint step {step} to {saved} ({time.time() - saving:.1f} s)")
        if stopping:
            break

    if step == soft.train_steps:
        monitor.summary(exits, train_exits, val_exits, os.path.join(args.output_dir, "summary.json"), extra)
    else:
        monitor.info(f"stopped at step {step} of {soft.train_steps}; continue with --resume")
    monitor.close()
    if step < last_step:
        raise SystemExit(preemption.EXIT_TO_BE_CONTINUED)


if __name__ == "__main__":
    main()
