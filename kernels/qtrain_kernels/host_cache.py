"""The caching allocator for CPU tensors (host_cache.cpp): built on first use, installed into torch.

The C++ source includes only c10's allocator headers, so a build is one compiler call (~2 s), cached
per source, torch version and C++ ABI under `$QTRAIN_KERNEL_CACHE` (default
`$XDG_CACHE_HOME/qtrain/kernels`, else `~/.cache/qtrain/kernels`). Loaded with ctypes: no Python
extension module, no pybind11. Nothing here runs at import.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

SOURCE = Path(__file__).with_name("host_cache.cpp")
PRIORITY = 1  # above torch's own default CPU allocator (0)


class HostCacheUnavailable(RuntimeError):
    """The allocator cannot be built or installed here; the message says why."""


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


def cache_root() -> Path:
    if os.environ.get("QTRAIN_KERNEL_CACHE"):
        return Path(os.environ["QTRAIN_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qtrain" / "kernels"


def _torch_paths() -> tuple[Path, Path, int, str]:
    import torch

    root = Path(torch.__file__).parent
    return root / "include", root / "lib", int(torch._C._GLIBCXX_USE_CXX11_ABI), torch.__version__


def library_path() -> Path:
    include, lib, abi, version = _torch_paths()
    key = hashlib.sha256(SOURCE.read_bytes() + f"|{version}|{abi}|{platform.machine()}".encode()).hexdigest()[:16]
    return cache_root() / f"host_cache-{key}.so"


def build(out: Path) -> Path:
    """Compile host_cache.cpp into `out` (written under a temporary name, then renamed: concurrent
    ranks building at once each finish with a whole file)."""
    if platform.system() != "Linux":
        raise HostCacheUnavailable(f"the host cache is built for Linux only (this is {platform.system()})")
    wanted = os.environ.get("CXX")
    compiler = shutil.which(wanted) if wanted else (shutil.which("c++") or shutil.which("g++"))
    if not compiler:
        raise HostCacheUnavailable(f"the C++ compiler CXX={wanted} was not found" if wanted
                                   else "no C++ compiler found (install g++, or set CXX)")
    include, lib, abi, _ = _torch_paths()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.stem + ".", suffix=".tmp")
    os.close(fd)
    cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           f"-I{include}", str(SOURCE), "-o", tmp, f"-L{lib}", "-lc10", f"-Wl,-rpath,{lib}"]
    try:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as exc:
            raise HostCacheUnavailable(f"running {compiler} failed: {exc}") from None
        if done.returncode != 0:
            raise HostCacheUnavailable(f"compiling {SOURCE.name} failed ({' '.join(cmd)}):\n{done.stderr.strip()}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        path = library_path()
        try:
            if not path.exists():
                build(path)
        except OSError:  # an unwritable cache root: build in a private temporary directory
            path = build(Path(tempfile.mkdtemp(prefix="qtrain-kernels-")) / path.name)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise HostCacheUnavailable(f"loading {path} failed: {exc}; delete it to rebuild") from None
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
