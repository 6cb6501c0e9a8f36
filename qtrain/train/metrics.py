"""What a run reports: metrics.jsonl lines, peak memory, parameter counts, summary.json."""

from __future__ import annotations

import json
import resource
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from qtrain.checkpoint.atomic import atomic_write_text
from qtrain.quant.linear import NF4Linear
from qtrain.quant.nf4 import NF4Weight


def peak_memory_mib(device: torch.device) -> float:
    """CUDA max allocated on GPU; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / 2**20 if sys.platform == "darwin" else kib / 2**10


def param_counts(model: nn.Module, numel: Callable[[torch.Tensor], int] = torch.Tensor.numel) -> tuple[int, int]:
    """(trainable, total); an NF4 weight counts as the parameters it stands for, not its bytes.

    `numel` counts a parameter's values over all ranks (an engine's, when it partitions them).
    """
    nf4_storage = {id(p) for m in model.modules() if isinstance(m, NF4Weight) for p in m.parameters()}
    params = [p for p in model.parameters() if id(p) not in nf4_storage]
    trainable = sum(numel(p) for p in params if p.requires_grad)
    total = sum(numel(p) for p in params)
    for m in model.modules():
        if isinstance(m, NF4Linear):
            total += m.in_features * m.out_features
    return trainable, total


class MetricsLog:
    """Appends one JSON object per logged step; flushed at once so a crash loses nothing logged."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = None

    def write(self, record: dict) -> None:
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def median_step_s(step_times: list[float]) -> float | None:
    """Median step time with the first (warm-up) step left out."""
    times = step_times[1:] or step_times
    return statistics.median(times) if times else None


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only records up to `last_step` (a resumed run rewrites the steps after its checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
