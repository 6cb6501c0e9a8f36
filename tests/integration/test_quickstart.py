"""The README's quickstart, shortened: runs end to end through the CLI, loss falls, outputs are complete."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qs") / "run"
    cmd = [sys.executable, "-m", "qtrain", "train", "configs/quickstart.yaml", f"output_dir={out}",
           "train.max_steps=40", "logging.every_steps=1", "checkpoint.every_steps=20"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: 40 steps" in proc.stdout
    return out


def test_loss_falls(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert set(rows[0]) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s"}
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 1.0, (first, last)


def test_summary_has_the_documented_fields(run_dir):
    s = json.loads((run_dir / "summary.json").read_text())
    for key in ("trainable_params", "total_params", "median_step_s", "tokens_per_s", "peak_memory_mib",
                "planned_peak_memory_mib", "final_train_loss", "final_eval_loss"):
        assert s[key] is not None, key
    assert 0 < s["trainable_params"] < s["total_params"]
    assert s["final_eval_loss"] > 0 and s["peak_memory_mib"] > 0 and s["planned_peak_memory_mib"] > 0


def test_adapter_loads_in_peft_on_the_written_base(run_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    base_dir = Path(cfg["base_model_name_or_path"])
    assert base_dir == (run_dir / "base").resolve() and (base_dir / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, str(run_dir / "adapter"))
    b_norm = sum(float(p.abs().sum()) for n, p in model.named_parameters() if "lora_B" in n)
    assert b_norm > 0  # trained, not the zero init


def test_checkpoints_are_committed_and_pruned_to_keep(run_dir):
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert steps == ["step-20", "step-40"]  # every 20 steps plus the last; keep: 2
    for step in steps:
        assert (run_dir / "checkpoints" / step / "COMMITTED").is_file()
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))  # no unfinished saves


def test_running_the_finished_command_again_resumes_at_the_end(run_dir):
    cmd = [sys.executable, "-m", "qtrain", "train", "configs/quickstart.yaml", f"output_dir={run_dir}",
           "train.max_steps=40", "logging.every_steps=1", "checkpoint.every_steps=20"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(step 40)" in proc.stdout and "done: 40 steps" in proc.stdout
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 40  # nothing retrained, nothing duplicated


@pytest.mark.skipif(sys.platform != "linux", reason="the caching host allocator is built on Linux")
def test_a_cpu_run_serves_its_large_tensors_from_the_caching_allocator(run_dir):
    """train.host_allocator: auto on a CPU run: the caching allocator ran, reused blocks far more often than
    it mapped new ones, and never held more than 1.25x its live high-water (+ the block that set it)."""
    import shutil

    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler: auto falls back to the system allocator")
    host = json.loads((run_dir / "summary.json").read_text())["host_allocator"]
    assert host["name"] == "caching", host
    assert host["hits"] > 10 * host["misses"] > 0, host
    assert 0 < host["peak_mapped_mib"] <= 1.25 * host["peak_live_mib"] + 1, host
