"""Stop requests from Slurm's signals, caught from a process's first moment.

Slurm signals a job's tasks before its time limit (SIGUSR2 from Submitit's `--signal`, SIGUSR1 from
a hand-written sbatch script), and with SIGTERM when it cancels, preempts or requeues the job. The
default action of these signals ends Python at once: one that arrives while torch is still being
imported would kill the task without a checkpoint (exit 138). `catch_early()` runs first thing in
`train` and in a Submitit job (this module imports nothing heavy), and the trainer's
`StopRequested` takes over whatever arrived before it existed. What to do after the checkpoint
(requeue, or end because the job was cancelled) is the caller's decision (`slurm.stop_action`).
"""

from __future__ import annotations

import signal
from typing import Any

# In the order that names a stop seen on several ranks (`StopRequested.agree`): a warning, then SIGTERM.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
# Signals that warn of a time limit (or of a preemption, with Slurm's PreemptParameters=send_user_signal).
WARNING_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)

_early: list[int] = []


def _record(signum: int, frame: Any) -> None:
    _early.append(signum)


def catch_early() -> None:
    """Record stop signals until a `StopRequested` is installed (instead of dying of them)."""
    for sig in STOP_SIGNALS:
        try:
            signal.signal(sig, _record)
        except ValueError:  # not the main thread
            pass


class StopRequested:
    """Set by any of STOP_SIGNALS: the training loop checkpoints at the next step boundary and
    returns, so nothing is lost. `signal` is the first signal received (a time-limit warning
    followed by Slurm's SIGTERM at the limit stays a time limit)."""

    def __init__(self) -> None:
        self.flag = False
        self.signal: int | None = None

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        for signum in _early:  # caught by catch_early before this handler existed
            self._handle(signum, None)
        _early.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.flag = True
        if self.signal is None:
            self.signal = signum

    def votes(self) -> list[float]:
        """This rank's stop flag and first signal (one-hot over STOP_SIGNALS), to sum over ranks."""
        return [float(self.flag), *(float(self.signal == sig) for sig in STOP_SIGNALS)]

    def agree(self, summed: list[float]) -> bool:
        """Adopt the stop of all ranks from their summed `votes`: Slurm signals a job's tasks one
        node after another, so a rank can learn of the stop from another before its own signal
        arrives (seen: rank 0 stopped with no signal, read it as a time limit and requeued a job
        `scancel` had just cancelled). A time-limit warning on any rank names the stop, as it does
        on one; then SIGTERM; no signal anywhere stays None (COLEARN_STOP_AFTER_STEPS)."""
        if summed[0] <= 0:
            return False
        self.flag = True
        self.signal = next((int(sig) for sig, count in zip(STOP_SIGNALS, summed[1:]) if count > 0), None)
        return True


def ignore_from_now() -> None:
    """Ignore stop signals once the run is saved and the process only has to exit: Python gives the
    default action (death) back to its handled signals while it shuts down, so a time-limit warning
    arriving then turned a finished Slurm job into a FAILED one (seen in tests/test_slurm.py)."""
    for sig in STOP_SIGNALS:
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass


__all__ = ["STOP_SIGNALS", "WARNING_SIGNALS", "StopRequested", "catch_early", "ignore_from_now"]
