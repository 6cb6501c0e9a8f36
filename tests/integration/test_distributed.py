"""Data parallelism on CPU (gloo, 2 processes under torchrun): equivalence, shards, crashes, resume."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parallel_runs import assert_same_training, losses, run_ddp, run_single
from tiers import EXTENDED

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ddp")
    single, ddp = root / "single", root / "ddp"
    p1 = run_single(single)
    assert p1.returncode == 0, p1.stderr[-2000:]
    # the 2 ranks checkpoint with `train.recompute: auto` (both take the mode the least free memory
    # allows; selective on any CPU box this runs on): the gradients are those of no checkpointing
    p2 = run_ddp(ddp, "train.gradient_checkpointing=true")
    assert p2.returncode == 0, p2.stderr[-3000:]
    return single, ddp


def test_two_ranks_equal_one_rank_with_twice_the_micro_batch(pair):
    single, ddp = pair
    assert_same_training(single, ddp)
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["recompute"] != "full" and summary["recompute_reason"].startswith("auto: ")


def test_two_ranks_build_the_data_cache_once_and_both_read_it(pair):
    _, ddp = pair
    cache = ddp / "data_cache"
    builds = [json.loads(line) for line in (cache / "builds.log").read_text().splitlines()]
    assert len(builds) == 1  # one rank built under the lock; the other waited and memory-mapped it
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [builds[0]["key"]]


def test_global_batch_is_reported_and_every_rank_state_is_checkpointed(pair):
    _, ddp = pair
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 2 * 2 * 2
    files = json.loads((ddp / "checkpoints" / "step-6" / "manifest.json").read_text())["files"]
    assert {"rng-rank-0.safetensors", "rng-rank-1.safetensors"} <= set(files)


def test_ddp_adapter_is_complete_and_loads_in_peft(pair):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    _, ddp = pair
    cfg = json.loads((ddp / "adapter" / "adapter_config.json").read_text())
    weights = load_file(str(ddp / "adapter" / "adapter_model.safetensors"))
    assert len(weights) == 2 * 7  # A and B for each of the 7 projections of the one layer
    assert all(t.numel() > 0 and bool(t.isfinite().all()) for t in weights.values())
    model = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, str(ddp / "adapter"))
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(weights)


def test_a_crashing_rank_takes_the_job_down_quickly(tmp_path):
    start = time.monotonic()
    proc = run_ddp(tmp_path / "out", fault="raise@step:2:rank:1", timeout=240)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "injected crash on rank 1" in proc.stderr
    assert elapsed < 120, elapsed  # torchrun tears the group down; nothing waits for the 60 s timeout
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "out")], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", "a rank survived the crash"


@EXTENDED
def test_sigkill_of_one_rank_then_resume_is_bit_exact(tmp_path):
    control = tmp_path / "control"
    assert run_ddp(control).returncode == 0
    out = tmp_path / "out"
    killed = run_ddp(out, fault="kill@step:5:rank:1")
    assert killed.returncode != 0
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-3"]
    resumed = run_ddp(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(step 3)" in resumed.stdout
    assert losses(out) == losses(control)


@EXTENDED
def test_preempting_one_rank_stops_every_rank_at_the_same_saved_step(tmp_path):
    out = tmp_path / "out"
    proc = run_ddp(out, fault="signal@step:4:TERM:rank:1")
    assert proc.returncode != 0  # torchrun reports the workers' exit 75 as a failure
    assert "preempted" in proc.stderr
    ckpt = out / "checkpoints" / "step-4"
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert {"rng-rank-0.safetensors", "rng-rank-1.safetensors"} <= set(files)
    resumed = run_ddp(out)
    assert resumed.returncode == 0 and "(step 4)" in resumed.stdout
