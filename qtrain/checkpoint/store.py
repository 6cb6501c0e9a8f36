"""The checkpoint directory protocol: write, commit, verify, find, prune.

    output_dir/checkpoints/
      step-N/                 one committed checkpoint
        ...files...           written by the trainer (adapter/, optimizer, trainer state, rng-rank-R)
        manifest.json         sha256 and size of every other file
        COMMITTED             written last; a dir without it is not a checkpoint
      latest                  "step-N" of the newest commit (a hint; verified, never trusted)
      .step-N.<id>.tmp/       an unfinished save: ignored, and removed at the next start

A save writes into a `.tmp` dir, fsyncs every file, writes the manifest, then the marker, then
renames the dir into place (one atomic rename) and finally moves the `latest` pointer. A crash at
any point leaves the previous committed checkpoint as the newest valid one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

from qtrain.checkpoint.atomic import atomic_write_text, fsync_path
from qtrain.errors import CheckpointError

MANIFEST = "manifest.json"
MARKER = "COMMITTED"
POINTER = "latest"
STEP_NAME = re.compile(r"^step-(\d+)$")


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name not in (MANIFEST, MARKER))


def pending_dir(output_dir: str | Path, step: int) -> Path:
    """The temporary dir several ranks share for step `step` (see `begin(shared=True)`)."""
    return checkpoints_root(output_dir) / f".step-{step}.shared.tmp"


def begin(output_dir: str | Path, step: int, shared: bool = False) -> Path:
    """A fresh temporary dir for step `step`'s files: unique, or the one all ranks write into."""
    root = checkpoints_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = pending_dir(output_dir, step) if shared else root / f".step-{step}.{uuid.uuid4().hex[:8]}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit(tmp: Path, step: int, meta: dict) -> Path:
    """Manifest, marker, rename, pointer: after this returns, step-N is the newest checkpoint."""
    files = {}
    for f in _files(tmp):
        fsync_path(f)
        files[str(f.relative_to(tmp))] = {"sha256": _sha256(f), "bytes": f.stat().st_size}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files, **meta}, indent=2, sort_keys=True))
    fsync_path(tmp / MANIFEST)
    (tmp / MARKER).write_text(f"step-{step}\n")
    fsync_path(tmp / MARKER)
    for d in [p for p in tmp.rglob("*") if p.is_dir()] + [tmp]:
        fsync_path(d)
    final = tmp.parent / f"step-{step}"
    if final.exists():  # a re-save of the same step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(tmp.parent)
    atomic_write_text(tmp.parent / POINTER, f"step-{step}\n")
    return final


def verify(ckpt: Path, required: list[str] = ()) -> dict:
    """The manifest of a committed, intact checkpoint; CheckpointError naming the first bad file."""
    if not (ckpt / MARKER).is_file():
        raise CheckpointError(f"{ckpt}: no {MARKER} marker: the save did not finish")
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{ckpt / MANIFEST}: unreadable manifest ({exc})") from None
    for name in required:
        if name not in files:
            raise CheckpointError(f"{ckpt / name}: missing from the checkpoint (was it saved by every rank?)")
    for name, info in files.items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != info["bytes"] or _sha256(path) != info["sha256"]:
            raise CheckpointError(f"{path}: contents do not match the manifest (truncated or corrupted)")
    return manifest


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def committed_steps(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of every step-N dir under checkpoints/, newest first; symlinks out are refused."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_NAME.match(p.name)
        if not m or not p.is_dir():
            continue
        if not _inside(p, root):
            raise CheckpointError(f"{p}: points outside {root}; refusing to read or delete it")
        out.append((int(m.group(1)), p))
    return sorted(out, reverse=True)


def read_pointer(output_dir: str | Path) -> str | None:
    """The `latest` pointer's checkpoint name, or None if absent; CheckpointError if garbage."""
    path = checkpoints_root(output_dir) / POINTER
    if not path.exists():
        return None
    text = path.read_text(errors="replace").strip()
    if not STEP_NAME.match(text):
        raise CheckpointError(f"{path}: expected a name like step-200, found {text[:40]!r}")
    return text


def abort(output_dir: str | Path, step: int) -> None:
    """Remove step `step`'s unfinished save (its `.tmp` dirs); committed checkpoints are untouched."""
    root = checkpoints_root(output_dir)
    if root.is_dir():
        for p in root.glob(f".step-{step}.*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def clean_partial(output_dir: str | Path) -> list[Path]:
    """Remove unfinished saves (`.*.tmp` dirs); returns what was removed."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def prune(output_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` committed checkpoints (call only after a commit)."""
    for _, path in committed_steps(output_dir)[keep:]:
        shutil.rmtree(path, ignore_errors=True)
