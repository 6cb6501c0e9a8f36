"""Faults found trying qtrain from outside: two runs on one output_dir, and a disk that fills up."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import cli_runs
import pytest

from qtrain.checkpoint.store import committed_steps, verify
from qtrain.errors import EXIT_DISK_FULL, EXIT_USER_ERROR
from tiers import EXTENDED

pytestmark = pytest.mark.slow

EXTRA = ["checkpoint.keep=2"]


def command(out: Path, *extra: str) -> list[str]:
    return cli_runs.command(out, *EXTRA, *extra)


def run(out: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    return cli_runs.run(out, *EXTRA, *extra, fault=fault)


def test_a_second_run_on_a_busy_output_dir_is_refused_and_a_dead_holder_does_not_block(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(command(out, "train.max_steps=100000", f"model.base_dir={tmp_path / 'base'}"),
                             cwd=cli_runs.REPO, env=cli_runs.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "metrics.jsonl").is_file():  # the first run holds the lock and is training
            assert first.poll() is None, first.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the first run never started training"
            time.sleep(0.5)
        second = run(out, "train.max_steps=2", f"model.base_dir={tmp_path / 'base'}")
        assert second.returncode == EXIT_USER_ERROR
        assert f"in use by another qtrain run: pid {first.pid}" in second.stderr
        assert first.poll() is None  # the running one was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = run(out, "train.max_steps=2", "checkpoint.resume=never", f"model.base_dir={tmp_path / 'base'}")
    assert third.returncode == 0, third.stderr[-2000:]  # the killed holder's lock died with it


def _assert_clean_disk_full_stop(proc: subprocess.CompletedProcess, out: Path) -> None:
    assert proc.returncode == EXIT_DISK_FULL, proc.stderr[-2000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("qtrain: stopped: no space left on device writing ")
    assert "(checkpoint step-6)" in message and "MiB are free" in message
    assert "step-3 is the newest complete checkpoint" in message
    assert "Traceback" not in proc.stderr
    root = out / "checkpoints"
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # the partial save was removed
    assert [p.name for _, p in committed_steps(out)] == ["step-3"]
    verify(root / "step-3")


@EXTENDED
def test_disk_full_during_a_save_stops_cleanly_keeping_the_last_checkpoint(tmp_path):
    """The write hook: the 2nd file of the step-6 save (4 files per save) fails with ENOSPC."""
    out = tmp_path / "run"
    proc = run(out, "train.max_steps=9", fault="enospc@save:after-file:6")
    _assert_clean_disk_full_stop(proc, out)
    resumed = run(out, "train.max_steps=9")
    assert resumed.returncode == 0 and "(step 3)" in resumed.stdout


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_really_full_filesystem_warns_at_start_and_stops_cleanly(tmp_path):
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "15m"):
        pytest.skip("needs root and tmpfs mounts to build a small filesystem")
    try:
        out = mnt / "run"
        out.mkdir()
        # The base and the data cache live outside the small filesystem: only the run's own files fill it.
        outside = (f"model.base_dir={tmp_path / 'base'}", f"data.cache_dir={tmp_path / 'data-cache'}")
        # Leave room for about one checkpoint (~0.2 MiB at this size) and the run's small files.
        free = shutil.disk_usage(mnt).free
        with open(mnt / "filler", "wb") as fh:
            fh.truncate(0)
            fh.write(b"\0" * (free - 400 * 1024))
        proc = run(out, "train.max_steps=9", *outside)
        assert "qtrain: WARNING: " in proc.stderr and "checkpoint.keep=2" in proc.stderr
        _assert_clean_disk_full_stop(proc, out)
        (mnt / "filler").unlink()
        resumed = run(out, "train.max_steps=9", *outside)
        assert resumed.returncode == 0 and "(step 3)" in resumed.stdout
        assert json.loads((out / "summary.json").read_text())["steps"] == 9
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
