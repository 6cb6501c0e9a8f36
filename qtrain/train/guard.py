"""Preemption signals and the non-finite policy.

SIGTERM and SIGUSR1 (SLURM sends one before the time limit with `--signal`) only set a flag;
the trainer checks it at the next step boundary, saves that step and exits with EXIT_PREEMPTED,
so a job script can requeue and the same command resumes.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptFlag:
    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    def _handler(self, signum, frame) -> None:
        self.signal = signum


@contextlib.contextmanager
def catch_preemption() -> Iterator[PreemptFlag]:
    """Install flag-setting handlers for the duration of a run, then restore the old ones."""
    flag = PreemptFlag()
    previous = {s: signal.signal(s, flag._handler) for s in PREEMPT_SIGNALS}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
