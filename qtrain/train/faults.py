"""Fault injection for reliability tests: inert unless QTRAIN_FAULT is set.

QTRAIN_FAULT is a comma-separated list of:
  kill@step:N[:rank:R]        SIGKILL this process right after optimizer step N (before any save)
  raise@step:N[:rank:R]       raise an exception (a crashing rank) right after optimizer step N
  crash@save:after-file:K     die abruptly (exit 137) during a checkpoint save, after its K-th file
  enospc@save:after-file:K    fail with "No space left on device" during a save, after its K-th file
  nan@step:N[:rank:R]         make step N's loss NaN (exercises the non-finite guard)
  overflow@step:N[:rank:R]    multiply step N's backward by 2^100 (fp16: the gradients overflow, the loss stays finite)
  signal@step:N:NAME[:rank:R] send signal NAME (TERM, USR1) to this process after step N
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass


@dataclass(frozen=True)
class Fault:
    kind: str
    point: str
    value: int
    rank: int | None = None
    signal_name: str | None = None


def parse(spec: str | None) -> list[Fault]:
    faults = []
    for item in filter(None, (spec or "").split(",")):
        kind, _, rest = item.partition("@")
        parts = rest.split(":")
        rank = int(parts[parts.index("rank") + 1]) if "rank" in parts else None
        if kind in ("crash", "enospc"):
            faults.append(Fault(kind, "save", int(parts[2])))
        elif kind == "signal":
            faults.append(Fault(kind, "step", int(parts[1]), rank, parts[2]))
        else:
            faults.append(Fault(kind, parts[0], int(parts[1]), rank))
    return faults


class FaultPlan:
    def __init__(self, rank: int, spec: str | None = None) -> None:
        self.rank = rank
        self.faults = [f for f in parse(spec if spec is not None else os.environ.get("QTRAIN_FAULT"))
                       if f.rank is None or f.rank == rank]
        self._files_saved = 0

    def _at(self, kind: str, step: int) -> Fault | None:
        return next((f for f in self.faults if f.kind == kind and f.value == step), None)

    def poison_loss(self, step: int) -> bool:
        return self._at("nan", step) is not None

    def backward_factor(self, step: int) -> float:
        return 2.0 ** 100 if self._at("overflow", step) is not None else 1.0

    def after_step(self, step: int) -> None:
        if self._at("raise", step):
            raise RuntimeError(f"QTRAIN_FAULT: injected crash on rank {self.rank} after step {step}")
        if self._at("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        fault = self._at("signal", step)
        if fault:
            os.kill(os.getpid(), getattr(signal, f"SIG{fault.signal_name}"))

    def file_saved(self) -> None:
        self._files_saved += 1
        if any(f.kind == "crash" and self._files_saved == f.value for f in self.faults):
            os._exit(137)
        if any(f.kind == "enospc" and self._files_saved == f.value for f in self.faults):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
