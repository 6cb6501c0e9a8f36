"""Disk space: warn at start when checkpoints will not fit, and turn a full disk into one clear stop.

A full disk during a save used to end in a bare safetensors traceback (`No space left on device`),
exit 1, with the half-written checkpoint left behind. Now the partial save is removed, the last
complete checkpoint stays the newest, and the run stops with EXIT_DISK_FULL and one message naming
the path, what was being written, and how much space it needs against what is free.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path
from typing import Callable, Iterator

from qtrain.errors import EXIT_DISK_FULL, TrainingStopped

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
MIB = 2 ** 20
# Bytes of optimizer state per trained parameter: two fp32 moments, or two 8-bit ones (+ block scales).
OPTIMIZER_BYTES = {"adamw": 8.0, "paged_adamw": 8.0, "adamw_8bit": 2.1, "paged_adamw_8bit": 2.1}


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT from Python's I/O, or from safetensors' Rust writer, which raises SafetensorError
    ("I/O error: No space left on device (os error 28)") instead of OSError."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL_ERRNOS
    text = str(exc)
    return type(exc).__name__ == "SafetensorError" and any(f"(os error {n})" in text for n in DISK_FULL_ERRNOS)


def free_mib(path: Path) -> float:
    """Free space (MiB) on the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free / MIB


def tree_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / MIB


def checkpoint_mib(trainable_params: int, optimizer: str) -> float:
    """A checkpoint's size: the trained weights in fp32 plus the optimizer state (RNG/trainer state are KBs)."""
    return trainable_params * (4.0 + OPTIMIZER_BYTES.get(optimizer, 8.0)) / MIB


def space_warning(out: Path, keep: int, ckpt_mib: float, artifact_mib: float) -> str | None:
    """A warning when `keep + 1` checkpoints (one is written before the oldest is pruned) and the final
    artifact do not fit in the free space of `out`'s filesystem."""
    need = (keep + 1) * ckpt_mib + artifact_mib
    free = free_mib(out)
    if need <= free:
        return None
    return (f"{out} has {free:.1f} MiB free, but {keep + 1} checkpoints (checkpoint.keep={keep}, one more while "
            f"saving; ~{ckpt_mib:.1f} MiB each) and the final artifact (~{artifact_mib:.1f} MiB) need ~{need:.1f} MiB; "
            "free space, lower checkpoint.keep, or choose another output_dir")


@contextlib.contextmanager
def disk_full_stop(what: str, where: Path, need_mib: float, after: str,
                   cleanup: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Inside: a full disk becomes TrainingStopped(EXIT_DISK_FULL) after `cleanup()` removed the partial write.

    Args:
        what: what was being written, e.g. "checkpoint step-200".
        where: the directory being written (its filesystem's free space is reported).
        need_mib: how much the write needs.
        after: what the user still has, e.g. "step-100 is the newest complete checkpoint".
    """
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - only a full disk is handled; everything else re-raises
        if not is_disk_full(exc):
            raise
        cleanup()
        path = getattr(exc, "filename", None) or where
        raise TrainingStopped(
            f"no space left on device writing {path} ({what}): it needs ~{need_mib:.1f} MiB and "
            f"{free_mib(where):.1f} MiB are free there; the partial write was removed and {after}; free space "
            "(or lower checkpoint.keep) and run the same command to resume", EXIT_DISK_FULL) from None
