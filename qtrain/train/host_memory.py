"""Host memory a training process gives back: glibc's mmap threshold, fixed once per process.

glibc serves an allocation from its heap unless it is at least the mmap threshold, and raises
that threshold (up to 32 MiB) every time an mmapped block is freed. A training step allocates and
frees the same large tensors again and again (dequantized weights, FSDP's gathered parameters,
logits): after the first frees they come from the heap, whose freed middle is not returned to
the system, so the process's RSS climbs towards the sum of a step's transients, not their peak.

Measured (random-init Llama hidden 2048 x 16 layers, FSDP over 2 gloo ranks, 1 thread each, 2 steps
of 256 tokens, 2-core AMD EPYC AVX2): peak RSS per rank 2853 and 3364 MiB in two runs as glibc
ships; 1940 MiB with the threshold fixed at 16 MiB (1892 at 4 MiB, 1774 at 1 MiB, where every
mmapped block costs fresh page faults). Step times stayed within the runs' noise.

Under an engine that gathers whole parameters from their shards and frees them every step (FSDP,
ZeRO-3) the heap fills with their freed bytes instead: DeepSpeed ZeRO-3 over 2 gloo ranks (same
model and steps) climbed to a rank peak of 2719 MiB with the threshold at 16 MiB while its gathered
parameters stayed under 320 MiB, and peaked at 1899 MiB at 1 MiB, with the same step times (~40 s,
1 thread per rank). Those runs take 1 MiB (`threshold_for`). A compute-bound single-process step
does not: the CPU benchmark's step (hidden 1024 x 8 layers, 2 threads) took ~190k page faults at
4 MiB instead of ~20k at 16 MiB, and 1.5x its time at 1 MiB.

`fix_mmap_threshold` is called by `qtrain train` before the model is loaded. A user who set
`MALLOC_MMAP_THRESHOLD_` (glibc's own variable) keeps theirs; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Any, Optional

THRESHOLD = 16 << 20
GATHERING_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
ENV = "MALLOC_MMAP_THRESHOLD_"


def threshold_for(gathers_parameters: bool) -> int:
    """The threshold for a run: 1 MiB under an engine that gathers and frees whole parameters every
    step (FSDP, ZeRO-3), else 16 MiB (see the module docstring for both measurements)."""
    return GATHERING_THRESHOLD if gathers_parameters else THRESHOLD


def fix_mmap_threshold(threshold: int = THRESHOLD, libc: Optional[Any] = None) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes (which also stops its dynamic raising).

    Returns whether it was set: False off glibc, or when the user's environment already sets it.
    """
    if os.environ.get(ENV):
        return False
    if libc is None:
        if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
            return False
        libc = ctypes.CDLL(None)
    mallopt = getattr(libc, "mallopt", None)
    return bool(mallopt is not None and mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1)
