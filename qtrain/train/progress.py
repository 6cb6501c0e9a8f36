"""Training progress on the terminal: a tqdm bar with ETA on a TTY, plain lines with ETA in logs.

A SLURM job's stderr is a file, where a carriage-return bar turns into one huge line; there each
logged step becomes one line instead: `train: step 40/150 (27%) loss 2.1034 lr 2.86e-03 eta 0:01:12`.
The ETA is the median of the steps timed so far in this process times the steps left (a resumed
run's rate is its own, not the interrupted run's).
"""

from __future__ import annotations

import statistics
import sys
import time
from datetime import timedelta

from tqdm.auto import tqdm


def format_eta(seconds: float) -> str:
    return str(timedelta(seconds=round(max(0.0, seconds))))


class Progress:
    def __init__(self, total: int, initial: int, enabled: bool, stream=None) -> None:
        self.total, self.done, self.enabled = total, initial, enabled
        self.stream = stream or sys.stderr
        self.interactive = enabled and self.stream.isatty()
        self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                         file=self.stream) if self.interactive else None
        self._times: list[float] = []
        self._last = time.perf_counter()

    def eta_s(self) -> float | None:
        if not self._times:
            return None
        return statistics.median(self._times) * (self.total - self.done)

    def update(self, loss: float, lr: float) -> None:
        """One step finished (call once per step, whatever its outcome)."""
        now = time.perf_counter()
        self._times.append(now - self._last)
        self._last = now
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            self._bar.update(1)

    def line(self, record: dict) -> None:
        """A logged step: printed as one line when there is no interactive bar."""
        if not self.enabled or self.interactive:
            return
        eta = self.eta_s()
        eta_text = f" eta {format_eta(eta)}" if eta is not None else ""
        skipped = f" (skipped: {record['skipped']})" if record.get("skipped") else ""
        print(f"train: step {record['step']}/{self.total} ({100 * record['step'] // self.total}%) "
              f"loss {record['loss']:.4f} lr {record['lr']:.2e}{eta_text}{skipped}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
