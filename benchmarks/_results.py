"""Results files: one JSON object per file, entries keyed (by device or benchmark), merged in place."""

from __future__ import annotations

import json
from pathlib import Path


def merge_result(path: Path, key: str, result: dict) -> None:
    """Write `result` under `key` in the JSON file at `path`, keeping the other entries; atomic replace."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
