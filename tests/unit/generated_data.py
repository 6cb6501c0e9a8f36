"""Shared by the bundled-data tests: a generator script must reproduce the committed files exactly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def assert_regenerates(script: Path, data_dir: Path, generated: list[str], tmp_path: Path) -> None:
    """Run `script --out tmp_path`; it must write exactly `generated`, byte-identical to `data_dir`'s."""
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True,
                   capture_output=True, cwd=tmp_path)
    made = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert made == sorted(generated)
    for name in generated:
        assert (tmp_path / name).read_bytes() == (data_dir / name).read_bytes(), name
