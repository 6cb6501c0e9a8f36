"""Reliability promises, each proven by a real run of the CLI with an injected fault.

A control comes first: two fault-free runs must give identical per-step losses, or nothing
else here can be judged. Runs are tiny (1 layer, hidden 64) so the whole file stays fast.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tiers import EXTENDED, extended_but

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS = 10
TINY = [
    "model.from_config.hidden_size=64", "model.from_config.intermediate_size=160",
    "model.from_config.num_hidden_layers=1", "model.from_config.num_attention_heads=4",
    "model.from_config.num_key_value_heads=2", f"train.max_steps={STEPS}", "train.warmup_steps=2",
    "train.micro_batch_size=4", "train.grad_accum=2", "train.num_threads=1", "train.deterministic=true",
    "peft.dropout=0.1",  # dropout draws from the RNG, so resume must restore it exactly
    "logging.every_steps=1", "logging.progress=false", "checkpoint.every_steps=3", "checkpoint.keep=3",
]


def run(out: Path, *extra: str, fault: str | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "QTRAIN_FAULT"}
    if fault:
        env["QTRAIN_FAULT"] = fault
    cmd = [sys.executable, "-m", "qtrain", "train", "configs/quickstart.yaml", f"output_dir={out}", *TINY, *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def losses(out: Path) -> dict[int, tuple[float, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows}


@pytest.fixture(scope="module")
def control(tmp_path_factory) -> dict[int, tuple[float, float]]:
    a, b = tmp_path_factory.mktemp("control_a"), tmp_path_factory.mktemp("control_b")
    for out in (a, b):
        proc = run(out / "run")
        assert proc.returncode == 0, proc.stderr[-2000:]
    la, lb = losses(a / "run"), losses(b / "run")
    assert sorted(la) == list(range(1, STEPS + 1))
    assert la == lb, "two fault-free runs differ: the reliability checks below would be meaningless"
    return la


@pytest.mark.parametrize("optimizer,kill_at", [pytest.param("adamw", 5, marks=EXTENDED),
                                                pytest.param("adamw", 7, marks=EXTENDED), ("adamw_8bit", 8)])
def test_sigkill_then_resume_is_bit_exact(tmp_path, control, optimizer, kill_at):
    out = tmp_path / "run"
    ref_dir = tmp_path / "ref"
    extra = [f"train.optimizer={optimizer}"]
    if optimizer != "adamw":
        assert run(ref_dir, *extra).returncode == 0
        control = losses(ref_dir)
    killed = run(out, *extra, fault=f"kill@step:{kill_at}")
    assert killed.returncode == -signal.SIGKILL
    resumed = run(out, *extra)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    last_ckpt = (kill_at // 3) * 3
    assert f"(step {last_ckpt})" in resumed.stdout
    assert losses(out) == control  # every step, including those recomputed after the resume point


@pytest.mark.parametrize("after_file", extended_but([1, 2, 3, 4], 2))
def test_crash_inside_a_save_leaves_the_previous_checkpoint(tmp_path, control, after_file):
    out = tmp_path / "run"
    # 4 files per save (rng, adapter, optimizer, trainer state); the 2nd save is step 6
    crashed = run(out, fault=f"crash@save:after-file:{4 + after_file}")
    assert crashed.returncode == 137
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-3"]
    assert list(ckpts.glob(".step-6.*.tmp"))  # the unfinished save is left behind...
    resumed = run(out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "(step 3)" in resumed.stdout and "unfinished checkpoint save" in resumed.stderr
    assert not list(ckpts.glob(".*.tmp"))  # ...and cleaned at the next start
    assert losses(out) == control


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = run(out, "train.max_steps=7")  # checkpoints at 3, 6 and 7
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture()
def two_checkpoints(tmp_path, finished_run) -> Path:
    """A private copy of a finished 7-step run (checkpoints step-3, step-6, step-7) to damage."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out, symlinks=True)
    return out


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated optimizer": lambda c: _truncate(c / "optimizer.safetensors"),
    "bit-flipped adapter": lambda c: _flip_bit(c / "adapter" / "adapter_model.safetensors"),
    "missing rank RNG": lambda c: (c / "rng-rank-0.safetensors").unlink(),
    "no commit marker": lambda c: (c / "COMMITTED").unlink(),
}


@pytest.mark.parametrize("name", extended_but(sorted(CORRUPTIONS), "bit-flipped adapter"))
def test_corrupt_newest_checkpoint_falls_back_loudly(two_checkpoints, name):
    out = two_checkpoints
    CORRUPTIONS[name](out / "checkpoints" / "step-7")
    proc = run(out, "train.max_steps=9")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "WARNING" in proc.stderr and "step-7" in proc.stderr
    assert "(step 6)" in proc.stdout


@EXTENDED
@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_checkpoint_named_explicitly_is_an_error_naming_the_file(two_checkpoints, name):
    out = two_checkpoints
    CORRUPTIONS[name](out / "checkpoints" / "step-7")
    proc = run(out, "train.max_steps=9", "checkpoint.resume=step-7")
    assert proc.returncode == 2
    assert "checkpoint error" in proc.stderr and "step-7" in proc.stderr and "Traceback" not in proc.stderr


@EXTENDED
@pytest.mark.parametrize("pointer", ["", "garbage\x00\xff", "../../etc"])
def test_bad_latest_pointer_is_reported_and_ignored(two_checkpoints, pointer):
    out = two_checkpoints
    (out / "checkpoints" / "latest").write_bytes(pointer.encode("utf-8", "surrogateescape"))
    proc = run(out, "train.max_steps=9")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "WARNING" in proc.stderr and "latest" in proc.stderr
    assert "(step 7)" in proc.stdout


def test_all_checkpoints_corrupt_never_starts_over_silently(two_checkpoints):
    out = two_checkpoints
    for ckpt in (out / "checkpoints").glob("step-*"):
        _truncate(ckpt / "trainer_state.json")
    proc = run(out, "train.max_steps=9")
    assert proc.returncode == 2
    assert "no intact checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoint_symlinked_outside_output_dir_is_refused(tmp_path, two_checkpoints):
    out = two_checkpoints
    outside = tmp_path / "elsewhere"
    (out / "checkpoints" / "step-7").rename(outside)
    (out / "checkpoints" / "step-7").symlink_to(outside)
    proc = run(out, "train.max_steps=9")
    assert proc.returncode == 2 and "outside" in proc.stderr
    assert outside.is_dir()  # and nothing was deleted through the link


@pytest.mark.parametrize("sig", extended_but(["TERM", "USR1"], "TERM"))
def test_preemption_saves_the_step_and_exits_75_then_resumes(tmp_path, control, sig):
    out = tmp_path / "run"
    stopped = run(out, fault=f"signal@step:4:{sig}")
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert "preempted" in stopped.stderr
    assert (out / "checkpoints" / "step-4" / "COMMITTED").is_file()
    resumed = run(out)
    assert resumed.returncode == 0 and "(step 4)" in resumed.stdout
    assert losses(out) == control


@EXTENDED
def test_nan_step_is_skipped_and_counted(tmp_path):
    out = tmp_path / "run"
    proc = run(out, fault="nan@step:4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped")] == [4]
    assert json.loads((out / "summary.json").read_text())["nonfinite_steps_skipped"] == 1
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(bool(t.isfinite().all()) for t in weights.values())


@pytest.mark.parametrize("policy,faults,expected_stop", [
    ("skip", "nan@step:4,nan@step:5,nan@step:6", 6),
    ("stop", "nan@step:4", 4),
])
def test_nonfinite_stop_saves_last_good_state_and_exits_3(tmp_path, policy, faults, expected_stop):
    out = tmp_path / "run"
    proc = run(out, f"train.nonfinite={policy}", fault=faults)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "non-finite" in proc.stderr
    ckpt = out / "checkpoints" / f"step-{expected_stop}"
    assert (ckpt / "COMMITTED").is_file()
    weights = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    assert all(bool(t.isfinite().all()) for t in weights.values())
    assert not (out / "adapter").exists()  # no final adapter from a failed run
