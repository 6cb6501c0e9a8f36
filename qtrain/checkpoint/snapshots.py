"""Periodic snapshots under `output_dir/checkpoints/step-N/`, newest `keep` retained."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

_STEP_DIR = re.compile(r"^step-(\d+)$")


def snapshot_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step}"


def list_snapshots(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of complete snapshots, oldest first; temporary leftovers are not listed."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def prune_snapshots(output_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` snapshots (called only after a new one is complete)."""
    for _, path in list_snapshots(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
