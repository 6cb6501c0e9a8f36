"""fp16 with dynamic loss scaling as a real training mode: overflows skipped and counted, the scale
checkpointed, resume bit-exact; `auto` reports what it picked."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import cli_runs
import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

EXTRA = ["train.max_steps=6", "train.deterministic=true"]


def run(out: Path, *extra: str, fault: str | None = None):
    return cli_runs.run(out, *EXTRA, *extra, fault=fault)


def records(out: Path) -> list[dict]:
    """metrics.jsonl without its timing field (the only one a resume may change)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def test_fp16_overflow_is_skipped_counted_and_resume_is_bit_exact(tmp_path):
    fp16 = ["model.dtype=float16"]
    control = tmp_path / "control"
    proc = run(control, *fp16, fault="overflow@step:2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "float16 compute with dynamic loss scaling" in proc.stdout
    rows = records(control)
    assert [r["step"] for r in rows if r.get("skipped")] == [2]
    assert rows[1]["skipped"] == "loss_scale_overflow"
    assert rows[0]["loss_scale"] == 65536.0 and rows[1]["loss_scale"] == 32768.0  # backed off after the overflow
    summary = json.loads((control / "summary.json").read_text())
    assert summary["loss_scaling"] and summary["compute_dtype"] == "float16"
    assert summary["loss_scale_overflows"] == 1 and summary["nonfinite_steps_skipped"] == 0
    state = json.loads((control / "checkpoints/step-3/trainer_state.json").read_text())
    assert state["scaler"]["scale"] == 32768.0

    resumed = tmp_path / "resumed"
    killed = run(resumed, *fp16, fault="overflow@step:2,kill@step:5")
    assert killed.returncode == -signal.SIGKILL
    again = run(resumed, *fp16)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "(step 3)" in again.stdout
    assert records(resumed) == records(control)
    assert json.loads((resumed / "summary.json").read_text())["loss_scale_overflows"] == 1
    a, b = (load_file(str(d / "adapter/adapter_model.safetensors")) for d in (control, resumed))
    assert all(a[k].equal(b[k]) for k in a)


def test_auto_reports_what_it_picked_and_why(tmp_path):
    out = tmp_path / "auto"
    proc = run(out, "train.max_steps=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compute_dtype"] in ("float32", "bfloat16")
    assert summary["compute_dtype_reason"].startswith("auto: this CPU has")
    assert f"precision: {summary['compute_dtype']} compute" in proc.stdout
    assert not summary["loss_scaling"] and summary["loss_scale_overflows"] == 0
