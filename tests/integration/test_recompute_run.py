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
    # 8 x 512 planned tokens: enough for the modes' plans to differ (at the tiny recipe's 2 x 64 they do not)
    extra = ["train.max_steps=1", "model.dtype=float32", "train.gradient_checkpointing=true",
             f"train.recompute={asked}", "data.max_len=512", "train.micro_batch_size=8"]
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
    if mode != "full":  # the plan was made for the mode taken, not the recipe's `auto` read as `full`
        assert summary["planned_peak_memory_mib"] > planned_peak_mib(recipe, out / "base", 1, "cpu", "full")


def test_a_selective_mode_under_zero3_exits_2_before_any_work(tmp_path):
    pytest.importorskip("deepspeed")
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    out = tmp_path / "run"
    proc = cli_runs.run(out, "distributed.engine=deepspeed", f"distributed.deepspeed_config={zero3}",
                        "train.gradient_checkpointing=true", "train.recompute=mlp")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.recompute: mlp cannot run under zero3" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_a_run_without_checkpointing_says_so(tmp_path):
    out = tmp_path / "run"
    proc = cli_runs.run(out, "train.max_steps=1", "model.dtype=float32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["recompute"], summary["recompute_reason"]) == (None, "no gradient checkpointing")
    assert "gradient checkpointing: off" in proc.stdout
