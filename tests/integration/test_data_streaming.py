"""Streamed training data survives SIGKILL: the resumed run repeats the uninterrupted one bit for bit.

The stream's position (window, micro-batches taken) is in the checkpoint; a resume re-reads the
file up to that window, re-encodes it in the worker pool and continues. The pool's workers must
not outlive the killed trainer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "model.from_config.hidden_size=64", "model.from_config.intermediate_size=160",
    "model.from_config.num_hidden_layers=1", "model.from_config.num_attention_heads=4",
    "model.from_config.num_key_value_heads=2", "model.dtype=float32", "train.max_steps=6", "train.warmup_steps=2",
    "train.micro_batch_size=4", "train.grad_accum=2", "train.num_threads=1", "train.deterministic=true",
    "logging.every_steps=1", "logging.progress=false", "checkpoint.every_steps=3",
    "data.streaming=true", "data.eval_split=0", "data.num_proc=2",
]


def _run(out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "QTRAIN_FAULT"}
    if fault:
        env["QTRAIN_FAULT"] = fault
    cmd = [sys.executable, "-m", "qtrain", "train", "configs/quickstart.yaml", f"output_dir={out}", *TINY]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _losses(out: Path) -> dict[int, tuple[float, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows}


def _survivors(out: Path) -> str:
    """Processes still running with `out` on their command line (forked workers inherit it)."""
    for _ in range(50):
        found = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.strip()
        if not found:
            return ""
        time.sleep(0.1)
    return found


def test_streaming_resume_after_sigkill_is_bit_exact(tmp_path):
    control = tmp_path / "control"
    done = _run(control)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "data: streaming" in done.stdout
    state = json.loads((control / "checkpoints" / "step-6" / "trainer_state.json").read_text())["data"]
    assert state["kind"] == "stream"

    out = tmp_path / "run"
    killed = _run(out, fault="kill@step:5")
    assert killed.returncode == -signal.SIGKILL
    assert _survivors(out) == "", "a data worker outlived the killed trainer"
    resumed = _run(out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "(step 3)" in resumed.stdout
    assert _losses(out) == _losses(control)
    assert sorted(_losses(control)) == list(range(1, 7))
