"""The SLURM script requeues exactly when qtrain exits with the preemption code (75)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "slurm" / "single_node.sbatch"
TINY = ["model.from_config.hidden_size=32", "model.from_config.intermediate_size=64",
        "model.from_config.num_hidden_layers=1", "model.from_config.num_attention_heads=2",
        "model.from_config.num_key_value_heads=1", "train.max_steps=4", "logging.progress=false",
        "checkpoint.every_steps=0"]


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def _run(tmp_path: Path, fault: str | None) -> tuple[subprocess.CompletedProcess, Path]:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    marker = tmp_path / "requeued"
    (fake_bin / "scontrol").write_text(f"#!/usr/bin/env bash\necho \"$@\" > {marker}\n")
    (fake_bin / "scontrol").chmod(0o755)
    env = {**os.environ, "SLURM_JOB_ID": "4242",
           "PATH": f"{fake_bin}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("QTRAIN_FAULT", None)
    if fault:
        env["QTRAIN_FAULT"] = fault
    cmd = ["bash", str(SCRIPT), "configs/quickstart.yaml", f"output_dir={tmp_path / 'out'}", *TINY]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300), marker


@pytest.mark.slow
def test_preempted_run_is_requeued(tmp_path):
    proc, marker = _run(tmp_path, "signal@step:2:USR1")
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert marker.read_text().split() == ["requeue", "4242"]


@pytest.mark.slow
def test_finished_run_is_not_requeued(tmp_path):
    proc, marker = _run(tmp_path, None)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not marker.exists()
