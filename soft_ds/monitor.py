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


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


class Monitor:
    def __init__(self, log_dir: str | None, enabled: bool, total_steps: int):
        self.enabled = enabled
        self.log_dir = log_dir
        self.total_steps = total_steps
        self.writer = None
        self.started, self.start_step = time.time(), 0

    def start(self, step: int):
        """Training begins at `step` (0, or the checkpoint resumed from): open the event files."""
        self.started, self.start_step = time.time(), step
        if self.enabled and self.log_dir:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step drops events an interrupted run logged after its last checkpoint.
            self.writer = SummaryWriter(self.log_dir, purge_step=step + 1 if step else None)

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

    def close(self):
        if self.writer:
            self.writer.close()


def error(message: str, rank: int) -> "SystemExit":
    """One clear error, printed once (by rank 0), before any training work starts."""
    if rank == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    return SystemExit(2)
