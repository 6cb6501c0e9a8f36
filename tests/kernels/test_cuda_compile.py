"""Every kernel variant the launchers would use compiles for A100 (sm_80) and H100 (sm_90), and
fits their shared memory. Runs without a GPU: triton ships ptxas (see cuda_compile_probe.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("cuda_compile_probe.py")
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # opt-in shared memory per block


def test_kernels_compile_for_sm80_and_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence 3.9's notice; every launch sets it anyway
    proc = subprocess.run([sys.executable, str(PROBE), *map(str, SHARED_LIMIT)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = {k: v["error"] for k, v in report.items() if not v["ok"]}
    assert not failed, failed
    too_big = {k: v["shared"] for k, v in report.items() if v["shared"] > SHARED_LIMIT[int(k[2:4])]}
    assert not too_big, too_big
