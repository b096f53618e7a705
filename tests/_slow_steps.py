"""soft_ds/train.py with slowed-down steps, for the Slurm requeue tests (tests/test_slurm.py runs it
as the job's PYTHON through a small shell wrapper). A tiny run trains in a second or two, faster
than a time limit's signal (Slurm checks limits every 30 s) or a test can act on it.

    _slow_steps.py TRAIN_PY [train.py options...]

Every rank sleeps before each step; the knobs are environment variables:
  SLOW_STEPS                seconds before every step of the job's first start
                            (SLURM_RESTART_COUNT unset or 0)
  SLOW_STEPS_AFTER_REQUEUE  seconds before every step of a requeued start
  SLOW_STEP_AT              "STEP:SECONDS": this long more before step STEP, in the first start
                            only (a step that a kill interrupts)
A sleep changes no number: the losses are an unslowed run's.
"""

import os
import sys
import time

from soft_ds import pipe, train


def main():
    first_start = int(os.environ.get("SLURM_RESTART_COUNT", "0")) == 0
    every = float(os.environ.get("SLOW_STEPS" if first_start else "SLOW_STEPS_AFTER_REQUEUE", "0"))
    at_step, at_seconds = map(float, os.environ.get("SLOW_STEP_AT", "0:0").split(":"))
    train_batch = pipe.SoftPipelineEngine.train_batch

    def slow_train_batch(self, *args, **kwargs):
        step = self.global_steps + 1  # the step about to run (global_steps counts those done)
        time.sleep(every + (at_seconds if first_start and step == at_step else 0))
        return train_batch(self, *args, **kwargs)
    pipe.SoftPipelineEngine.train_batch = slow_train_batch
    train.main(sys.argv[2:])

if __name__ == "__main__":
    main()
