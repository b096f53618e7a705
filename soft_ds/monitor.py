"""Per-exit monitoring: TensorBoard scalars, a console progress line and the final summary table.

Only the logging rank (global rank 0) writes; every other rank gets a Monitor that does nothing.
Values arrive already reduced over data-parallel ranks and gathered from every stage
(`SoftPipelineModule.reduce_exit_losses`).

TensorBoard tags:
  train/loss                 SoFT loss (weighted mean over exits) of the step
  train/exit_{n}/loss, /ppl  exit n's cross-entropy and perplexity
  train/exit_{n}/share       exit n's share of the step's loss (soft.exit_schedule; 0: skipped)
  train/lr, train/grad_norm, train/tokens_per_s
  val/loss, val/exit_{n}/loss, val/exit_{n}/ppl
"""

import json
import math
import sys
import time
from typing import NoReturn


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


class Monitor:
    """What a run shows: the start banner, a progress line and TensorBoard scalars every
    soft.log_interval steps (and at the last), validation lines, and the per-exit summary."""

    def __init__(self, log_dir: str | None, enabled: bool, soft):
        self.enabled = enabled
        self.log_dir = log_dir
        self.total_steps = soft.train_steps
        self.log_interval = soft.log_interval
        # the exits' shares of the loss vary by step: the progress line shows them
        self.show_shares = soft.exit_schedule != "all" or soft.exit_warmup_steps > 0
        self.writer = None
        self.started, self.start_step = time.time(), 0

    def banner(self, run, place):
        """The start lines: what trains, where, in which precision, on which rows and stages (`run`:
        train.PreparedRun; `place`: distributed.DistributedEnv)."""
        import deepspeed
        import torch
        import transformers

        from soft_ds.data.packing import row_fill
        from soft_ds.distributed import device_line, device_type
        from soft_ds.model import packed_attention_kernel
        from soft_ds.partition import balance_ratio
        soft, config = run.soft, run.config
        schedule = "" if soft.exit_schedule == "all" else f" ({soft.exit_schedule}, k={soft.exit_sample_k})"
        schedule += f" (warm-up {soft.exit_warmup_steps} steps)" if soft.exit_warmup_steps else ""
        self.info(f"SoFT ({soft.mode}) | exits {[e.layer for e in run.exits]}{schedule} | {config.exit_loss} exit "
                  f"loss | {soft.pipeline_stages} stages x {run.data_parallel} data parallel | train batch "
                  f"{config.train_batch_size(place.world_size)} | {len(run.train_set)} train / "
                  f"{len(run.val_set)} val records")
        self.info(f"  {place.launcher}, world size {place.world_size} | {device_line(place)} | torch "
                  f"{torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")
        self.info(f"  precision: {config.precision} | {config.autocast_reason}")
        rows, fill = row_fill(run.lengths, soft.seed, soft.seq_len, soft.packing)
        kernel = packed_attention_kernel(device_type(), config.compute_dtype)
        self.info(f"  {'packed' if soft.packing else 'padded'} rows of {soft.seq_len} tokens: {len(run.train_set)} "
                  f"train records in {rows} rows per epoch, {fill:.0%} of their positions real tokens"
                  + (f"; packed attention: {kernel}" if soft.packing else ""))
        for i, stage in enumerate(run.stages):
            self.info(f"  stage {i}: layers {stage.first_layer}-{stage.last_layer}, exits {list(stage.exits)}")
        self.info(f"  stage balance (slowest / mean cost): {balance_ratio(run.stages):.3f}")

    def frozen_model(self, module, exits) -> dict:
        """SFT+ICT's line (the model frozen, heads training); the run facts the summary records."""
        if not module.frozen_base:
            return {}
        extra = {"extra_parameters": module.extra_parameters()}
        self.info(f"  SFT+ICT: the model is frozen; {sum(e.own_head for e in exits)} exit heads train, "
                  f"{extra['extra_parameters']:,} parameters beyond the model's")
        return extra

    def start(self, step: int):
        """Training begins at `step` (0, or the checkpoint resumed from): open the event files."""
        self.started, self.start_step = time.time(), step
        if self.enabled and self.log_dir:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step drops events an interrupted run logged after its last checkpoint.
            self.writer = SummaryWriter(self.log_dir, purge_step=step + 1 if step else None)

    def due(self, step: int, last_step: int) -> bool:
        """Whether step `step` is logged: every log_interval steps, and the last step of this run."""
        return step % self.log_interval == 0 or step == last_step

    def train_step(self, step: int, loss: float, exit_losses: dict[int, float], lr: float, grad_norm,
                   tokens_per_s: float, exits, shares: dict[int, float]):
        """A logged step: TensorBoard scalars, each exit's share, the progress line."""
        grad_norm = float(grad_norm) if grad_norm is not None else None
        self.scalars("train", step, loss, exit_losses, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s)
        self.exit_shares(step, exits, shares)
        self.progress(step, loss, exit_losses, lr, grad_norm, tokens_per_s, shares if self.show_shares else None)

    def validation(self, step: int, exits, exit_losses: dict[int, float]):
        loss = sum(exit_losses[e.layer] * e.weight for e in exits) / sum(e.weight for e in exits)
        self.scalars("val", step, loss, exit_losses)
        self.info(f"validation at step {step}: " + " ".join(f"exit {n}: {v:.4f}" for n, v in exit_losses.items()))

    def scalars(self, prefix: str, step: int, loss: float | None, exit_losses: dict[int, float], **extra):
        if not self.writer:
            return
        if loss is not None:
            self.writer.add_scalar(f"{prefix}/loss", loss, step)
        for layer, value in exit_losses.items():
            self.writer.add_scalar(f"{prefix}/exit_{layer}/loss", value, step)
            self.writer.add_scalar(f"{prefix}/exit_{layer}/ppl", perplexity(value), step)
        for name, value in extra.items():
            if value is not None:
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def exit_shares(self, step: int, exits, shares: dict[int, float]):
        """Each exit's share of the step's loss, 0 for an exit the step skipped."""
        if not self.writer:
            return
        for e in exits:
            self.writer.add_scalar(f"train/exit_{e.layer}/share", shares.get(e.layer, 0.0), step)

    def progress(self, step: int, loss: float, exit_losses: dict[int, float], lr: float,
                 grad_norm: float | None, tokens_per_s: float, shares: dict[int, float] | None = None):
        """shares: the exits' shares of the loss, shown when they vary by step (soft.exit_schedule)."""
        if not self.enabled:
            return
        done = step - self.start_step
        remaining = (time.time() - self.started) / max(done, 1) * (self.total_steps - step)
        exits = " ".join(f"{layer}:{value:.3f}" for layer, value in exit_losses.items())
        norm = f" | gnorm {grad_norm:.3f}" if grad_norm is not None else ""
        if shares is not None:
            exits += " | shares " + " ".join(f"{layer}:{share:.2f}" for layer, share in shares.items())
        print(f"step {step}/{self.total_steps} | loss {loss:.4f} | exits {exits} | lr {lr:.2e}{norm} | "
              f"{tokens_per_s:,.0f} tok/s | eta {remaining / 60:.1f} min", flush=True)

    def info(self, message: str):
        if self.enabled:
            print(message, flush=True)

    def summary(self, exits, train: dict[int, float], val: dict[int, float], path: str | None,
                extra: dict | None = None):
        """Print the per-exit table and write it as JSON (with `extra` run facts beside it)."""
        if not self.enabled:
            return
        rows = [{"exit": e.layer, "weight": e.weight, "train_loss": train.get(e.layer),
                 "val_loss": val.get(e.layer),
                 "val_ppl": perplexity(val[e.layer]) if e.layer in val else None} for e in exits]

        def fmt(x):
            return "-" if x is None else f"{x:.4f}" if x < 1e4 else f"{x:.3e}"
        lines = ["", "Per-exit results", f"{'exit':>6} {'train loss':>11} {'val loss':>10} {'val ppl':>10}"]
        for r in rows:
            lines.append(f"{r['exit']:>6} {fmt(r['train_loss']):>11} {fmt(r['val_loss']):>10} {fmt(r['val_ppl']):>10}")
        print("\n".join(lines), flush=True)
        if path:
            with open(path, "w") as f:
                json.dump({"exits": rows, **(extra or {})}, f, indent=2)
            print(f"summary written to {path}", flush=True)

    def finish(self, step: int, exits, train: dict[int, float], val: dict[int, float], path: str, extra: dict):
        """The per-exit summary when the run has reached its last step; else how to continue it."""
        if step == self.total_steps:
            self.summary(exits, train, val, path, extra)
        else:
            self.info(f"stopped at step {step} of {self.total_steps}; continue with --resume")
        self.close()

    def close(self):
        if self.writer:
            self.writer.close()


def fail(message: str, rank: int = 0) -> NoReturn:
    """One `error: ...` line on stderr (from rank 0 only: every rank finds the same problem), then
    exit code 2: what every command does with input it cannot run."""
    if rank == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)
