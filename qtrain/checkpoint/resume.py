"""Which checkpoint a run continues from.

`resume: auto` takes the newest intact checkpoint; a damaged one (missing marker, a file that
does not match the manifest, a missing rank's RNG state, a garbage `latest` pointer) is reported
as a WARNING on stderr and the next older one is tried. If checkpoints exist but none is intact
the run stops with a CheckpointError: it never starts over silently.
`resume: step-N` takes exactly that checkpoint and fails on any problem.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from qtrain.checkpoint.store import checkpoints_root, clean_partial, committed_steps, read_pointer, verify
from qtrain.errors import CheckpointError


def warn(message: str) -> None:
    print(f"qtrain: WARNING: {message}", file=sys.stderr, flush=True)


def find_resume_point(output_dir: str | Path, mode: str, required: list[str],
                      warn_fn: Callable[[str], None] = warn) -> Path | None:
    """The checkpoint dir to resume from, or None to start fresh (mode `never`, or nothing saved yet)."""
    if mode == "never":
        return None
    removed = clean_partial(output_dir)
    if removed:
        warn_fn(f"removed {len(removed)} unfinished checkpoint save(s): {', '.join(p.name for p in removed)}")
    root = checkpoints_root(output_dir)
    steps = committed_steps(output_dir)
    if mode != "auto":
        match = [p for _, p in steps if p.name == mode]
        if not match:
            raise CheckpointError(f"checkpoint.resume: {root / mode} does not exist")
        verify(match[0], required)
        return match[0]
    pointer_seen = (root / "latest").exists()
    try:
        pointer = read_pointer(output_dir)
        if pointer and pointer not in {p.name for _, p in steps}:
            warn_fn(f"{root / 'latest'} names {pointer}, which does not exist; using the newest intact checkpoint")
    except CheckpointError as exc:
        warn_fn(f"{exc}; using the newest intact checkpoint")
    for _, path in steps:
        try:
            verify(path, required)
            return path
        except CheckpointError as exc:
            warn_fn(f"{exc}; falling back to the previous checkpoint")
    if steps or pointer_seen:
        raise CheckpointError(f"{root}: no intact checkpoint to resume from (see the warnings above); "
                              "remove the damaged ones, or set checkpoint.resume=never to start over")
    return None
