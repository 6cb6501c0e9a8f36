"""Tiny `qtrain train` runs through the real CLI, for tests that judge exit codes, files and messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The quickstart recipe at 1 layer, hidden 64, one thread, a step per log line: seconds per run.
TINY = ["model.from_config.hidden_size=64", "model.from_config.intermediate_size=160",
        "model.from_config.num_hidden_layers=1", "model.from_config.num_attention_heads=4",
        "model.from_config.num_key_value_heads=2", "train.micro_batch_size=2", "train.grad_accum=1",
        "train.num_threads=1", "data.max_len=64", "logging.every_steps=1", "logging.progress=false",
        "checkpoint.every_steps=3"]


def env(fault: str | None = None) -> dict:
    """The test environment without a stray QTRAIN_FAULT, plus `fault` if given."""
    e = {k: v for k, v in os.environ.items() if k != "QTRAIN_FAULT"}
    if fault:
        e["QTRAIN_FAULT"] = fault
    return e


def command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qtrain", "train", "configs/quickstart.yaml", f"output_dir={out}", *TINY, *extra]


def run(out: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command(out, *extra), cwd=REPO, env=env(fault), capture_output=True, text=True,
                          timeout=300)
