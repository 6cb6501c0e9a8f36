"""Results files: one JSON object per file, entries keyed (by device or benchmark), merged in place."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional


def merge_result(path: Path, key: str, result: dict,
                 combine: Optional[Callable[[Optional[dict], dict], dict]] = None) -> None:
    """Write `result` under `key` in the JSON file at `path`, keeping the other entries; atomic replace.

    `combine(old entry or None, result)` gives what is written instead, for a result that updates
    part of the entry already there.
    """
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = combine(data.get(key), result) if combine is not None else result
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
