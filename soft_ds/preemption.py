"""Stopping a run to be continued: a signal asks for it, every rank stops after the same step,
the run saves and exits with EXIT_TO_BE_CONTINUED.

    with StopRequest() as stop:              # SIGUSR1 and SIGTERM are noted from here on
        ...
        while step < last_step:
            ...train one step...
            if stop.agreed(engine.device):   # every rank, at every step boundary
                ...save step, exit with EXIT_TO_BE_CONTINUED...

Slurm sends SIGUSR1 ahead of a job's time limit when asked to (`#SBATCH --signal=USR1@300`, as
slurm/soft.sbatch does; `scancel --signal=USR1 JOBID` sends it by hand) and SIGTERM when it
preempts, requeues or cancels a job. The handler only notes the signal, so the step in flight
(and a checkpoint save in flight) finishes. The ranks do not receive a signal at the same
instant, and some may not receive it at all, so each step boundary ends with one all-reduce
(MAX) of every rank's note: all ranks see the same answer after the same step and save the same
step. The save is checkpoint.save's (`latest` moves last, in one rename), so a kill that follows
the signal mid-save leaves the previous checkpoint the one a resumed run continues from.
"""

import signal

import torch

# sysexits' EX_TEMPFAIL ("temporary failure; the user is invited to retry"): the run saved a
# checkpoint and wants to be continued with --resume. slurm/soft.sbatch requeues the job on it.
EXIT_TO_BE_CONTINUED = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Notes SIGUSR1/SIGTERM while active (a context manager: the previous handlers come back on
    exit); `agreed()` says whether any rank has been asked to stop."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = signals
        self.received: str | None = None  # name of the last stop signal this process received
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, exc_type, exc, traceback):
        # On the way out with EXIT_TO_BE_CONTINUED the checkpoint is saved and the process ends:
        # further stop signals are ignored rather than handed back. The first rank to exit with a
        # non-zero code makes srun (--kill-on-bad-exit) SIGTERM the ranks still shutting down, and
        # a death by that signal would hide the exit code the job script requeues on.
        continuing = isinstance(exc, SystemExit) and exc.code == EXIT_TO_BE_CONTINUED
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_IGN if continuing else handler)
        self._previous.clear()

    def _note(self, signum, frame):
        self.received = signal.Signals(signum).name

    def agreed(self, device) -> bool:
        """Whether any rank has received a stop signal. Every rank calls this at the same step
        boundary (a collective); `device` is where the backend reduces (the engine's device)."""
        asked = torch.tensor([self.received is not None], dtype=torch.int32, device=device)  # (1,)
        torch.distributed.all_reduce(asked, op=torch.distributed.ReduceOp.MAX)
        return bool(asked.item())
