"""The caching allocator for CPU tensors (host_cache.cpp): built on first use, installed into torch.

The C++ source includes only c10's allocator headers; `native` builds it (one compiler call, cached)
and loads it with ctypes. Nothing here runs at import.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from qtrain_kernels import native

SOURCE = Path(__file__).with_name("host_cache.cpp")
PRIORITY = 1  # above torch's own default CPU allocator (0)


HostCacheUnavailable = native.NativeUnavailable  # the allocator cannot be built or installed here


@dataclass(frozen=True)
class HostCacheStats:
    """qtrain_host_cache_stats' figures, in its order."""

    live: int  # bytes in blocks handed out now
    peak_live: int  # the most bytes ever handed out at once (the cap on what stays cached)
    cached: int  # bytes in free blocks kept for reuse
    mapped: int  # live + cached
    peak_mapped: int
    hits: int  # requests served from a cached block
    misses: int  # requests that mapped a new block
    unmapped: int  # bytes given back to the system so far

    def as_dict(self) -> dict:
        mib = 1 << 20
        return {"peak_live_mib": round(self.peak_live / mib, 1), "peak_mapped_mib": round(self.peak_mapped / mib, 1),
                "cached_mib": round(self.cached / mib, 1), "hits": self.hits, "misses": self.misses}


_lib: Optional[ctypes.CDLL] = None
_installed = False


def _load() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        lib = native.load(SOURCE, libs=("c10",))
        lib.qtrain_host_cache_install.argtypes = [ctypes.c_int]
        lib.qtrain_host_cache_install.restype = ctypes.c_int
        lib.qtrain_host_cache_release.restype = ctypes.c_size_t
        lib.qtrain_host_cache_stats.argtypes = [ctypes.POINTER(ctypes.c_uint64)]
        lib.qtrain_host_cache_stats.restype = None
        _lib = lib
    return _lib


def install() -> None:
    """Make the caching allocator torch's CPU allocator for the rest of the process (idempotent).
    Raises HostCacheUnavailable when it cannot be built, or when another allocator of higher
    priority is installed."""
    global _installed
    done = _load().qtrain_host_cache_install(PRIORITY)
    if done < 0:
        raise HostCacheUnavailable("torch's current CPU allocator has no raw deleter to serve small tensors with")
    if done == 0:
        raise HostCacheUnavailable("another CPU allocator of higher priority is installed in torch")
    _installed = True


def installed() -> bool:
    """Whether install() succeeded in this process."""
    return _installed


def release() -> int:
    """Unmap the cached free blocks; returns the bytes given back (0 when not installed)."""
    return int(_lib.qtrain_host_cache_release()) if _lib is not None else 0


def stats() -> HostCacheStats:
    out = (ctypes.c_uint64 * len(fields(HostCacheStats)))()
    if _lib is not None:
        _lib.qtrain_host_cache_stats(out)
    return HostCacheStats(*(int(v) for v in out))
