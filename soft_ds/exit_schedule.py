"""Which exits train at each optimizer step, and with what weight (`soft.exit_schedule`).

* "all": every exit every step at its configured weight (the paper).
* "random-k": the last layer and k - 1 of the other exits, drawn afresh each step (SortedNet's
  random sub-models). The last layer is always drawn so that the full model trains every step,
  as in LayerSkip; a step with k exits runs k heads instead of all of them.
* "rotate": the last layer and k - 1 of the other exits taken in turn, step after step (LayerSkip's
  rotational curriculum): every exit trains once every ceil((E - 1) / (k - 1)) steps.
* warm-up (any schedule, `soft.exit_warmup_steps` = N): the exits below the last layer have their
  weight multiplied by step / N until step N (EE-LLM's warm-up), so step 0 trains the last layer
  only and the intermediate exits come in gradually.

The choice is a pure function of (seed, step): every rank of every pipeline stage computes the same
set with no communication, and a resumed run draws exactly what an uninterrupted one did (nothing
to save). An exit left out of a step's `weights` is skipped: its head does not run at all (that is
the saving), and the step's loss is the weighted mean over the exits that ran.
"""

import random
from dataclasses import dataclass

SCHEDULES = ("all", "random-k", "rotate")


@dataclass(frozen=True)
class ExitSchedule:
    kind: str = "all"  # one of SCHEDULES
    k: int = 0  # random-k / rotate: exits per step, the last layer included
    warmup_steps: int = 0  # intermediate exits' weights ramp linearly from 0 over this many steps
    seed: int = 0  # random-k's draws: a function of (seed, step) only

    def active(self, layers, step: int) -> list[int]:
        """The exit layers that run at optimizer step `step` (0-based), sorted; the deepest always."""
        layers = sorted(layers)
        last, others = layers[-1], layers[:-1]
        if self.kind == "all" or self.k >= len(layers):
            return layers
        if self.kind == "random-k":
            # Seeding with a string hashes it with SHA-512: the same on every process and Python run.
            chosen = random.Random(f"soft-ds exit schedule/{self.seed}/{step}").sample(others, self.k - 1)
        elif self.kind == "rotate":
            start = step * (self.k - 1)
            chosen = [others[(start + i) % len(others)] for i in range(self.k - 1)]
        else:
            raise ValueError(f"exit_schedule must be one of {', '.join(SCHEDULES)}, got {self.kind!r}")
        return sorted(chosen) + [last]

    def weights(self, exits, step: int | None) -> dict[int, float]:
        """{layer: weight} of the exits that run at `step`; step None: every exit at its configured
        weight (validation). Warm-up: a weight ramped to 0 leaves its exit out."""
        if step is None:
            return {e.layer: e.weight for e in exits}
        last = max(e.layer for e in exits)
        ramp = min(1.0, step / self.warmup_steps) if self.warmup_steps else 1.0
        active = set(self.active([e.layer for e in exits], step))
        weights = {e.layer: e.weight * (1.0 if e.layer == last else ramp) for e in exits if e.layer in active}
        return {layer: w for layer, w in weights.items() if w > 0 or layer == last}

    def shares(self, exits, step: int | None) -> dict[int, float]:
        """{layer: share of the step's loss} for the exits that run: weights / their sum, so the loss
        is the weighted mean over the exits that ran. An exit absent from the dict is skipped."""
        weights = self.weights(exits, step)
        total = sum(weights.values())
        return {layer: w / total for layer, w in weights.items()}
