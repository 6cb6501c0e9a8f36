"""`peft.method: full`: every weight trains, checkpoints resume bit-exactly, the result is a normal HF model dir."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parallel_runs import REPO, TINY, clean_env, losses, run_ddp, run_single
from qtrain.config import load_recipe
from qtrain.errors import ConfigError
from tiers import EXTENDED

pytestmark = pytest.mark.slow
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
FULL = ["peft.method=full", "quant.method=none", "train.lr=1e-3", "train.deterministic=true",
        "train.schedule=constant", "train.warmup_steps=0"]


def run(out: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "qtrain", "train", "configs/quickstart.yaml", f"output_dir={out}", *TINY, *FULL, *extra]
    return subprocess.run(cmd, cwd=REPO, env=clean_env(fault), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    proc = run(out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_full_needs_an_unquantized_base():
    with pytest.raises(ConfigError, match="peft.method: 'full' .* set quant.method: none"):
        load_recipe(QUICKSTART, ["peft.method=full"])


def test_full_under_deepspeed_is_refused_by_name():
    with pytest.raises(ConfigError, match="peft.method: 'full' is not supported under DeepSpeed"):
        load_recipe(QUICKSTART, ["peft.method=full", "quant.method=none",
                                 "distributed.deepspeed_config=configs/deepspeed/zero2.json"])


def test_every_weight_trains_and_the_model_dir_reloads_with_the_trained_logits(finished):
    from transformers import AutoModelForCausalLM

    summary = json.loads((finished / "summary.json").read_text())
    assert summary["method"] == "full" and summary["trainable_percent"] == 100.0
    assert summary["trainable_params"] == summary["total_params"]
    base = load_file(str(finished / "base" / "model.safetensors"))
    trained = load_file(str(finished / "checkpoints" / "step-6" / "weights.safetensors"))
    for name, value in trained.items():
        assert not torch.equal(value, base[name].float()), f"{name} did not move"
    model = AutoModelForCausalLM.from_pretrained(str(finished / "model"), dtype=torch.float32).eval()
    ours = {k: v for k, v in model.state_dict().items() if k in trained}
    assert ours.keys() == trained.keys()
    for k in trained:
        torch.testing.assert_close(ours[k], trained[k], rtol=0, atol=0, msg=k)  # fp32 recipe: saved as trained
    ids = torch.tensor([[1, 17, 42, 99, 5, 8]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    assert (finished / "model" / "tokenizer.json").is_file()


@EXTENDED
def test_killed_full_run_resumes_bit_exactly(tmp_path, finished):
    out = tmp_path / "run"
    killed = run(out, fault="kill@step:4")
    assert killed.returncode == -signal.SIGKILL
    resumed = run(out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "(step 3)" in resumed.stdout
    assert losses(out) == losses(finished)
    a = load_file(str(out / "checkpoints" / "step-6" / "weights.safetensors"))
    b = load_file(str(finished / "checkpoints" / "step-6" / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.distributed
@EXTENDED
def test_full_fine_tuning_under_ddp_equals_one_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    p1 = run_single(single, *FULL)
    assert p1.returncode == 0, p1.stderr[-2000:]
    p2 = run_ddp(ddp, *FULL)
    assert p2.returncode == 0, p2.stderr[-3000:]
    a, b = losses(single), losses(ddp)
    assert len(a) == len(b) == 6
    for (la, ga), (lb, gb) in zip(a, b):  # fp32: all-reduce order changes the last bits only
        assert la == pytest.approx(lb, rel=2e-6) and ga == pytest.approx(gb, rel=2e-6)
    wa = load_file(str(single / "checkpoints" / "step-6" / "weights.safetensors"))
    wb = load_file(str(ddp / "checkpoints" / "step-6" / "weights.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5, msg=k)


def test_eval_of_a_full_run_loads_its_model_dir(finished):
    proc = subprocess.run([sys.executable, "-m", "qtrain", "eval", "configs/quickstart.yaml", f"output_dir={finished}",
                           *TINY, *FULL, "--no-generate"], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((finished / "eval.json").read_text())
    assert report["base"] == str(finished / "model") and report["adapter"] is None
    summary = json.loads((finished / "summary.json").read_text())
    assert report["eval_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-6)


def test_saved_model_keeps_tied_weights_tied():
    from qtrain.checkpoint.full_io import cast_state

    shared, other = torch.randn(4, 3), torch.randn(4, 3)
    state = cast_state({"embed.weight": shared, "lm_head.weight": shared, "other.weight": other,
                        "steps": torch.tensor([3])}, torch.bfloat16)
    assert state["embed.weight"] is state["lm_head.weight"] and state["embed.weight"].dtype == torch.bfloat16
    assert state["other.weight"] is not state["embed.weight"] and state["steps"].dtype == torch.int64
    torch.testing.assert_close(state["other.weight"], other.to(torch.bfloat16), rtol=0, atol=0)


def test_full_fine_tuning_with_triton_kernels_trains_on_the_logits_path(tmp_path):
    # The fused linear + cross-entropy assumes a frozen head in the compute dtype; full fine-tuning
    # trains an fp32 head under bf16 autocast, so it must stay on the logits path (it crashed before).
    cmd = [sys.executable, "-m", "qtrain", "train", "configs/quickstart.yaml", f"output_dir={tmp_path / 'run'}",
           *TINY, *FULL, "model.dtype=bfloat16", "kernels=triton", "train.max_steps=1"]
    proc = subprocess.run(cmd, cwd=REPO, env={**clean_env(), "TRITON_INTERPRET": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 1
