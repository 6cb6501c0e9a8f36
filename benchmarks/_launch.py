"""Run `qtrain train` under torchrun from a benchmark's child process and read what it reports."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._harness import REPO


def torchrun_train(nproc: int, overrides: list[str], label: str, recipe: str = "configs/quickstart.yaml") -> dict:
    """summary.json of a `qtrain train RECIPE overrides...` run on `nproc` ranks, plus
    `peak_rss_mib_per_rank`: the largest rank's lifetime peak RSS (RUSAGE_CHILDREN covers every
    descendant, so call this once per fresh process). SystemExit with stderr if the run fails."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "qtrain", "train", recipe, f"output_dir={out}", *overrides]
        env = {k: v for k, v in os.environ.items() if k != "QTRAIN_FAULT"}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
        summary = json.loads((out / "summary.json").read_text())
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # max over all descendants
    return {**summary, "peak_rss_mib_per_rank": round(peak_kib / 1024, 1)}
