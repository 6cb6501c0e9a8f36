"""Host memory of a training process: torch's allocator for CPU tensors, and glibc's mmap threshold.

`choose_host_allocator` installs qtrain's caching allocator (kernels/qtrain_kernels/host_cache.cpp)
for CPU tensors when the model computes on the CPU (`train.host_allocator: auto`). Served by glibc,
a step's large tensors, freed and allocated again in a slightly different order every step, leave
holes in its heap that stay resident: on the CPU benchmark's step (hidden 1024 x 8 layers, 2 threads,
`mlp` recompute) the heap spanned 550-660 MiB at its high-water mark with 60-130 MiB of torch's
allocations live in it. The caching allocator maps each block of 64 KiB or more on its own and keeps
it, freed, for the next request of (nearly) its size, so a step reuses the last one's blocks; what it
holds stays within 1.25x its live high-water (host_cache.cpp says how). On that step: peak RSS
941 MiB instead of 1166-1219 (mlp), the same or shorter step times, since pages are not faulted in
again. Measured on a 2-core AMD EPYC, AVX2 only; benchmarks/bench_cpu_step.py has the comparison
with the anchor.

The rest of this module is glibc's mmap threshold, fixed once per process.

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

Fixing the mmap threshold also stops glibc from moving its trim threshold (the free bytes at the
top of the heap it keeps rather than hand back) to twice the mmap threshold, as it otherwise does
as the threshold rises: left at its 128 KiB default, the heap's top is handed back after nearly
every step and the next step faults it in again. So the trim threshold is fixed at twice the mmap
threshold, glibc's own rule. Measured on the CPU benchmark's step (hidden 1024 x 8 layers, 2
threads, no checkpointing): 4-36k page faults per step and a median step of 2.47 s with the trim
threshold at its default, under 20 per step (one step at 15k) and 2.37 s at 32 MiB; HF's process
(glibc as shipped) took ~2.2 s with almost none.

`fix_mmap_threshold` is called by `qtrain train` before the model is loaded. A user who set
`MALLOC_MMAP_THRESHOLD_` (glibc's own variable) keeps theirs, and one who set
`MALLOC_TRIM_THRESHOLD_` keeps that; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass
from typing import Any, Optional

import torch

from qtrain.errors import ConfigError

THRESHOLD = 16 << 20
GATHERING_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_M_TRIM_THRESHOLD = -1
ENV = "MALLOC_MMAP_THRESHOLD_"
TRIM_ENV = "MALLOC_TRIM_THRESHOLD_"


def threshold_for(gathers_parameters: bool) -> int:
    """The threshold for a run: 1 MiB under an engine that gathers and frees whole parameters every
    step (FSDP, ZeRO-3), else 16 MiB (see the module docstring for both measurements)."""
    return GATHERING_THRESHOLD if gathers_parameters else THRESHOLD


def fix_mmap_threshold(threshold: int = THRESHOLD, libc: Optional[Any] = None) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes (which also stops its dynamic raising), and its
    trim threshold at twice that unless the user's environment sets it.

    Returns whether the mmap threshold was set: False off glibc, or when the user's environment
    already sets it.
    """
    if os.environ.get(ENV):
        return False
    if libc is None:
        if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
            return False
        libc = ctypes.CDLL(None)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or mallopt(_M_MMAP_THRESHOLD, int(threshold)) != 1:
        return False
    if not os.environ.get(TRIM_ENV):
        mallopt(_M_TRIM_THRESHOLD, 2 * int(threshold))
    return True


@dataclass(frozen=True)
class HostAllocator:
    """Which allocator serves this process's CPU tensors, and why (run header, summary.json)."""

    name: str  # "caching" | "system"
    reason: str

    @property
    def caching(self) -> bool:
        return self.name == "caching"


def choose_host_allocator(setting: str, device: torch.device) -> HostAllocator:
    """Apply `train.host_allocator`: install the caching allocator for `caching`, and for `auto` when the
    model computes on the CPU (on a GPU a step's host tensors are few). `caching` that cannot be built
    here is a ConfigError; `auto` then falls back to the system's allocator and says why."""
    from qtrain_kernels import host_cache

    if setting == "system":
        return HostAllocator("system", "train.host_allocator: system")
    if setting == "auto" and device.type != "cpu":
        return HostAllocator("system", f"auto: the model computes on {device.type}")
    try:
        host_cache.install()
    except host_cache.HostCacheUnavailable as exc:
        if setting == "caching":
            raise ConfigError(f"train.host_allocator: caching cannot be used here: {exc}; "
                              "set train.host_allocator: system (or auto)") from None
        return HostAllocator("system", f"auto: the caching allocator is unavailable ({exc})")
    return HostAllocator("caching", f"{setting}: CPU tensors of 64 KiB or more reuse cached blocks, "
                                    "kernels/qtrain_kernels/host_cache.cpp")


def release_cached_blocks() -> int:
    """Give the caching allocator's free blocks back to the system (after loading, whose transients
    a training step does not reuse). Returns the bytes given back; 0 without the caching allocator."""
    from qtrain_kernels import host_cache

    return host_cache.release()


def host_cache_report(allocator: HostAllocator) -> dict:
    """summary.json's `host_allocator` entry: name, reason and, for the caching allocator, its figures."""
    from qtrain_kernels import host_cache

    out = {"name": allocator.name, "reason": allocator.reason}
    if allocator.caching:
        out.update(host_cache.stats().as_dict())
    return out
