"""Shared by the DDP and DeepSpeed tests: tiny fp32 runs and the 'N ranks == 1 process' check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
# fp32 end to end, so ranks-vs-single differences are summation order only (no bf16 rounding).
TINY = ["model.from_config.hidden_size=64", "model.from_config.intermediate_size=160",
        "model.from_config.num_hidden_layers=1", "model.from_config.num_attention_heads=4",
        "model.from_config.num_key_value_heads=2", "model.dtype=float32", "train.max_steps=6",
        "train.grad_accum=2", "train.num_threads=1", "logging.every_steps=1", "logging.progress=false",
        "checkpoint.every_steps=3", "distributed.timeout_s=60"]


def clean_env(fault: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "QTRAIN_FAULT"}
    if fault:
        env["QTRAIN_FAULT"] = fault
    return env


def tool(name: str) -> str:
    """A console script installed beside this interpreter (works in an unactivated venv)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def losses(out: Path) -> list[tuple[float, float]]:
    return [(r["loss"], r["grad_norm"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def run_single(out: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    """One process with micro-batch 4: what 2 ranks x micro-batch 2 must reproduce."""
    cmd = [sys.executable, "-m", "qtrain", "train", "configs/quickstart.yaml", f"output_dir={out}", *TINY,
           "train.micro_batch_size=4", *extra]
    return subprocess.run(cmd, cwd=REPO, env=clean_env(fault), capture_output=True, text=True, timeout=300)


def run_ddp(out: Path, *extra: str, fault: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """2 ranks under torchrun with micro-batch 2 each."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "qtrain", "train", "configs/quickstart.yaml", f"output_dir={out}", *TINY,
           "train.micro_batch_size=2", *extra]
    return subprocess.run(cmd, cwd=REPO, env=clean_env(fault), capture_output=True, text=True, timeout=timeout)


ZERO2 = "distributed.deepspeed_config=configs/deepspeed/zero2.json"


def run_ds(out: Path, *extra: str, fault: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """2 ranks under DeepSpeed's own launcher (ZeRO-2), micro-batch 2 each; on a CPU-only machine
    `--num_gpus 2` just starts 2 processes."""
    cmd = [tool("deepspeed"), "--no_local_rank", "--num_nodes", "1", "--num_gpus", "2", "--module", "qtrain", "train",
           "configs/quickstart.yaml", f"output_dir={out}", *TINY, "train.micro_batch_size=2",
           "distributed.engine=deepspeed", ZERO2, *extra]
    return subprocess.run(cmd, cwd=REPO, env=clean_env(fault), capture_output=True, text=True, timeout=timeout)


def assert_same_training(single: Path, parallel: Path) -> None:
    """Per-step losses and grad norms (logged to 6 decimals) and the final adapter agree.

    fp32 all-reduce order changes the last bits only: 2e-6 relative on the logged values,
    1e-6 absolute on adapter weights of magnitude ~0.1.
    """
    a, b = losses(single), losses(parallel)
    assert len(a) == len(b) == 6
    for (la, ga), (lb, gb) in zip(a, b):
        assert la == pytest.approx(lb, rel=2e-6) and ga == pytest.approx(gb, rel=2e-6)
    wa = load_file(str(single / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(parallel / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)
