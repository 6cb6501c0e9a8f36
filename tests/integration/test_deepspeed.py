"""DeepSpeed ZeRO-1/2 on CPU (gloo, 2 processes under the `deepspeed` launcher): equivalence with one
process, complete adapters, refusals (conflicting JSON, paged optimizers), exact resume.
ZeRO-3 (the 4-bit base partitioned) is tested in test_sharding.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

from parallel_runs import REPO, ZERO2, assert_same_training, clean_env, losses, run_ds, run_single  # noqa: E402
from tiers import EXTENDED  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]



@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("deepspeed")
    single, zero2 = root / "single", root / "zero2"
    p1 = run_single(single)
    assert p1.returncode == 0, p1.stderr[-2000:]
    p2 = run_ds(zero2, "train.gradient_checkpointing=true")  # with `train.recompute: auto`, as in test_distributed
    assert p2.returncode == 0, p2.stderr[-3000:]
    return single, zero2


def test_zero2_two_ranks_equal_one_rank_with_twice_the_micro_batch(pair):
    single, zero2 = pair
    # grad_clip 1.0 is active at every step here (norms 1.25..1.76), so clipping is compared too
    assert_same_training(single, zero2)


@EXTENDED
def test_zero1_two_ranks_equal_one_rank_too(pair, tmp_path):
    single, _ = pair
    proc = run_ds(tmp_path / "zero1", "distributed.deepspeed_config=configs/deepspeed/zero1.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (la, ga), (lb, gb) in zip(losses(single), losses(tmp_path / "zero1"), strict=True):
        assert la == pytest.approx(lb, rel=2e-6) and ga == pytest.approx(gb, rel=2e-6)


@EXTENDED
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    out = tmp_path / "out"
    proc = run_ds(out, fault="nan@step:4:rank:1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [4]
    assert json.loads((out / "summary.json").read_text())["nonfinite_steps_skipped"] == 1
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(bool(t.isfinite().all()) for t in weights.values())


def test_a_partitioned_adapter_is_never_saved():
    from qtrain.distributed.engine import check_whole
    from qtrain.errors import CheckpointError

    model = torch.nn.Linear(4, 4)
    check_whole(model)
    model.weight.data = torch.empty(0)  # what ZeRO-3 leaves on a partitioned parameter outside a gather
    with pytest.raises(CheckpointError, match="refusing to save a partitioned adapter: weight"):
        check_whole(model)


def test_zero2_adapter_and_checkpoint_are_complete_and_load_in_peft(pair):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    single, zero2 = pair
    weights = load_file(str(zero2 / "adapter" / "adapter_model.safetensors"))
    shapes = {k: v.shape for k, v in load_file(str(single / "adapter" / "adapter_model.safetensors")).items()}
    assert {k: v.shape for k, v in weights.items()} == shapes and len(weights) == 2 * 7
    assert all(t.numel() > 0 and bool(t.isfinite().all()) for t in weights.values())
    cfg = json.loads((zero2 / "adapter" / "adapter_config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, str(zero2 / "adapter"))
    assert len([n for n, _ in model.named_parameters() if "lora_" in n]) == len(weights)
    files = json.loads((zero2 / "checkpoints" / "step-6" / "manifest.json").read_text())["files"]
    assert {"zero-optimizer-rank-0.safetensors", "zero-optimizer-rank-1.safetensors",
            "rng-rank-0.safetensors", "rng-rank-1.safetensors"} <= set(files)
    summary = json.loads((zero2 / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 2 * 2 * 2


@EXTENDED
def test_sigkill_of_one_rank_then_resume_is_bit_exact_under_zero2(pair, tmp_path):
    _, control = pair
    out = tmp_path / "out"
    killed = run_ds(out, fault="kill@step:5:rank:1")
    assert killed.returncode != 0
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-3"]
    resumed = run_ds(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(step 3)" in resumed.stdout
    assert losses(out) == losses(control)


@EXTENDED
def test_bitsandbytes_8bit_optimizer_works_as_the_client_optimizer(tmp_path):
    proc = run_ds(tmp_path / "out", "train.optimizer=adamw_8bit", "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Not compared with one process: 8-bit blocks follow ZeRO's flat partition, not each tensor.
    assert all(l == l and l < 8 for l, _ in losses(tmp_path / "out"))


def _refused(tmp_path: Path, *extra: str) -> str:
    """A single process is enough: the DeepSpeed config is checked before the model is built."""
    proc = run_single(tmp_path / "out", "distributed.engine=deepspeed", *extra)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    return proc.stderr


@EXTENDED
def test_a_json_that_contradicts_the_recipe_is_an_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 8}))
    err = _refused(tmp_path, f"distributed.deepspeed_config={bad}")
    assert "'gradient_accumulation_steps' is 8, but the recipe gives 2" in err
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}))
    assert "'optimizer' is set, but qtrain's recipe owns it" in _refused(tmp_path, f"distributed.deepspeed_config={bad}")


def test_paged_optimizers_are_refused_naming_what_works(tmp_path):
    err = _refused(tmp_path, ZERO2, "train.optimizer=paged_adamw_8bit")
    assert "'paged_adamw_8bit' is not supported under DeepSpeed" in err and "adamw, adamw_8bit" in err


def test_launcher_dry_run_prints_the_deepspeed_command():
    env = {**clean_env(), "QTRAIN_DRY_RUN": "1"}
    out = subprocess.run(["launch/deepspeed.sh", "2", "configs/quickstart.yaml", ZERO2], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["deepspeed", "--no_local_rank", "--num_gpus", "2", "--module", "qtrain", "train", "configs/quickstart.yaml",
                           ZERO2]


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_deepspeed_config_builds(path):
    from qtrain.config.schema import Recipe
    from qtrain.distributed.deepspeed_config import build_config

    recipe = Recipe()
    recipe.train.optimizer = "adamw"
    recipe.distributed.deepspeed_config = str(path)
    cfg = build_config(recipe, world_size=2)
    t = recipe.train
    assert cfg["train_batch_size"] == t.micro_batch_size * t.grad_accum * 2
    assert cfg["gradient_accumulation_steps"] == t.grad_accum and cfg["gradient_clipping"] == t.grad_clip
