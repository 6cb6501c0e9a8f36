"""A `qtrain train` run with gradient checkpointing resolves `train.recompute: auto`, says what it took
and why in its header and summary.json, and plans its peak with that mode."""

from __future__ import annotations

import json

import cli_runs
import pytest

from qtrain.config import load_recipe
from qtrain.plan.planner import planned_peak_mib
from qtrain.plan.recompute_choice import FASTEST_FIRST
from tiers import extended_but

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("asked", extended_but(["auto", "attention"], "auto"))
def test_a_checkpointed_run_reports_its_recompute_mode(tmp_path, asked):
    out = tmp_path / "run"
    extra = ["train.max_steps=1", "model.dtype=float32", "train.gradient_checkpointing=true",
             f"train.recompute={asked}"]
    proc = cli_runs.run(out, *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    mode, reason = summary["recompute"], summary["recompute_reason"]
    assert mode in FASTEST_FIRST
    if asked == "auto":
        assert reason.startswith("auto: ")
    else:
        assert (mode, reason) == ("attention", "set in the recipe")
    assert f"gradient checkpointing: recompute {mode} ({reason})" in proc.stdout
    recipe = load_recipe(cli_runs.REPO / "configs" / "quickstart.yaml", [f"output_dir={out}", *cli_runs.TINY, *extra])
    assert summary["planned_peak_memory_mib"] == planned_peak_mib(recipe, out / "base", 1, "cpu", mode)


def test_a_run_without_checkpointing_says_so(tmp_path):
    out = tmp_path / "run"
    proc = cli_runs.run(out, "train.max_steps=1", "model.dtype=float32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["recompute"], summary["recompute_reason"]) == (None, "no gradient checkpointing")
    assert "gradient checkpointing: off" in proc.stdout
