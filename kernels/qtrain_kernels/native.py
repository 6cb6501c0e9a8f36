"""Building and loading qtrain's C++ CPU libraries (host_cache.cpp, nf4_cpu.cpp).

Each is one compiler call against torch's headers and libraries (a few seconds), cached per source,
flags, torch version and C++ ABI under `$QTRAIN_KERNEL_CACHE` (default `$XDG_CACHE_HOME/qtrain/kernels`,
else `~/.cache/qtrain/kernels`), and loaded with ctypes: no Python extension module, no pybind11.
Nothing here runs at import.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence


class NativeUnavailable(RuntimeError):
    """A library cannot be built or loaded here; the message says why."""


def cache_root() -> Path:
    if os.environ.get("QTRAIN_KERNEL_CACHE"):
        return Path(os.environ["QTRAIN_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qtrain" / "kernels"


def _torch_paths() -> tuple[Path, Path, int, str]:
    import torch

    root = Path(torch.__file__).parent
    return root / "include", root / "lib", int(torch._C._GLIBCXX_USE_CXX11_ABI), torch.__version__


def _command(source: Path, out: str, flags: Sequence[str], libs: Sequence[str]) -> list[str]:
    include, lib, abi, _ = _torch_paths()
    return ["-O2", "-std=c++17", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *flags, f"-I{include}",
            str(source), "-o", out, f"-L{lib}", *(f"-l{name}" for name in libs), f"-Wl,-rpath,{lib}"]


def library_path(source: Path, flags: Sequence[str] = (), libs: Sequence[str] = ()) -> Path:
    _, _, abi, version = _torch_paths()
    salt = f"|{version}|{abi}|{platform.machine()}|{' '.join(flags)}|{' '.join(libs)}"
    key = hashlib.sha256(source.read_bytes() + salt.encode()).hexdigest()[:16]
    return cache_root() / f"{source.stem}-{key}.so"


def build(source: Path, out: Path, flags: Sequence[str] = (), libs: Sequence[str] = ()) -> Path:
    """Compile `source` into `out` (written under a temporary name, then renamed: concurrent ranks
    building at once each finish with a whole file)."""
    if platform.system() != "Linux":
        raise NativeUnavailable(f"{source.name} is built for Linux only (this is {platform.system()})")
    wanted = os.environ.get("CXX")
    compiler = shutil.which(wanted) if wanted else (shutil.which("c++") or shutil.which("g++"))
    if not compiler:
        raise NativeUnavailable(f"the C++ compiler CXX={wanted} was not found" if wanted
                                else "no C++ compiler found (install g++, or set CXX)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.stem + ".", suffix=".tmp")
    os.close(fd)
    cmd = [compiler, *_command(source, tmp, flags, libs)]
    try:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as exc:
            raise NativeUnavailable(f"running {compiler} failed: {exc}") from None
        if done.returncode != 0:
            raise NativeUnavailable(f"compiling {source.name} failed ({' '.join(cmd)}):\n{done.stderr.strip()}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load(source: Path, flags: Sequence[str] = (), libs: Sequence[str] = ()) -> ctypes.CDLL:
    """The built library of `source` (built first when not cached), loaded."""
    path = library_path(source, flags, libs)
    try:
        if not path.exists():
            build(source, path, flags, libs)
    except OSError:  # an unwritable cache root: build in a private temporary directory
        path = build(source, Path(tempfile.mkdtemp(prefix="qtrain-kernels-")) / path.name, flags, libs)
    try:
        return ctypes.CDLL(str(path))
    except OSError as exc:
        raise NativeUnavailable(f"loading {path} failed: {exc}; delete it to rebuild") from None
