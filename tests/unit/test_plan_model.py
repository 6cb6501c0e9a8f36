"""The planner's building blocks against independent oracles: stored NF4 bytes, bitsandbytes'
optimizer state, config.json arithmetic, DeepSpeed JSONs, and the storage tracker's accounting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qtrain.config import load_recipe
from qtrain.errors import ConfigError
from qtrain.plan import components as comp
from qtrain.plan.engines import resolve_engine
from qtrain.plan.model_shape import model_shape
from qtrain.plan.target import parse_memory
from qtrain.quant.nf4 import NF4Spec, NF4Weight
from qtrain.train.memtrack import StorageTracker

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
MODEL_DIRS = sorted(p.parent for p in (REPO / "configs" / "models").glob("*/config.json"))


@pytest.mark.parametrize("shape", [(64, 64), (160, 64), (64, 160), (100, 30)])
@pytest.mark.parametrize("blocksize,double_quant", [(64, True), (64, False), (128, True)])
def test_nf4_bytes_equal_what_a_quantized_weight_stores(shape, blocksize, double_quant):
    weight = NF4Weight.quantize(torch.randn(shape), NF4Spec(blocksize, double_quant))
    assert comp.nf4_bytes(shape[0] * shape[1], blocksize, double_quant) == weight.nbytes()


@pytest.mark.parametrize("name", ["adamw_8bit", "adamw"])
def test_optimizer_state_bytes_equal_what_the_optimizer_allocates(name):
    import bitsandbytes as bnb

    # one tensor under bitsandbytes' min_8bit_size (fp32 state), one over it (8-bit state + absmax)
    params = [torch.nn.Parameter(torch.randn(16, 64)), torch.nn.Parameter(torch.randn(128, 160))]
    opt = bnb.optim.AdamW8bit(params) if name == "adamw_8bit" else torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        shared = {id(opt.state[p].get(k)) for k in ("qmap1", "qmap2")}  # one quantization map per optimizer
        held = sum(v.nbytes for v in opt.state[p].values()
                   if torch.is_tensor(v) and v.numel() > 1 and id(v) not in shared)
        assert held == comp.optimizer_state_bytes(p.numel(), name)


def _published_count(cfg: dict) -> int:
    """Parameters of a Llama decoder from its config.json, by hand."""
    h, i, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return layers * per_layer + vocab * h * (1 if cfg["tie_word_embeddings"] else 2) + h


@pytest.mark.parametrize("model_dir", MODEL_DIRS, ids=lambda p: p.name)
def test_shipped_model_shapes_count_every_parameter_from_config_alone(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    shape = model_shape(load_recipe(QUICKSTART, [f"model.path={model_dir}", "model.from_config=null"]))
    layers = cfg["num_hidden_layers"]
    assert shape.total_params == _published_count(cfg)
    assert sum(lin.quantized for lin in shape.linears) == 7 * layers  # every projection, not lm_head
    assert len(shape.adapted) == 7 * layers                           # quickstart targets all seven
    assert shape.dense_params == cfg["vocab_size"] * cfg["hidden_size"] * 2 + cfg["hidden_size"] * (2 * layers + 1)


def test_targets_and_quantization_follow_the_recipe():
    over = [f"model.path={MODEL_DIRS[0]}", "model.from_config=null", "peft.targets=[q_proj,v_proj]",
            "quant.method=none"]
    shape = model_shape(load_recipe(QUICKSTART, over))
    assert {lin.name.rsplit(".", 1)[-1] for lin in shape.adapted} == {"q_proj", "v_proj"}
    assert not any(lin.quantized for lin in shape.linears) and shape.dense_params == shape.total_params


@pytest.mark.parametrize("method", ["dora", "ia3", "prompt_tuning", "diff_pruning"])
def test_a_method_outside_the_memory_model_is_refused_and_a_run_gets_no_estimate(method):
    from qtrain.plan.planner import run_estimate

    over = [f"model.path={MODEL_DIRS[0]}", "model.from_config=null", f"peft.method={method}"]
    with pytest.raises(ConfigError, match=f"peft.method: '{method}' is not in the memory model yet"):
        model_shape(load_recipe(QUICKSTART, over))
    estimate = run_estimate(load_recipe(QUICKSTART, over), MODEL_DIRS[0], 1, "cpu")
    assert estimate.peak_mib is None and estimate.line.startswith("plan: no estimate (qtrain plan: peft.method")


@pytest.mark.parametrize("text,expected", [("24GiB", 24 * 2**30), ("80GB", 80 * 10**9), ("81920MiB", 80 * 2**30),
                                           ("24G", 24 * 2**30), ("1.5 TiB", int(1.5 * 2**40)), ("512", 512)])
def test_memory_sizes_read_as_written(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["24 gigs", "GiB", "-3GB", "0GB", "twenty"])
def test_unreadable_memory_sizes_name_the_flag(text):
    with pytest.raises(ConfigError, match="--gpu-mem"):
        parse_memory(text)


def _ds_json(tmp_path: Path, zero: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": zero}))
    return f"distributed.deepspeed_config={path}"


def test_engine_shares_come_from_the_recipe_and_its_deepspeed_json(tmp_path):
    plain = load_recipe(QUICKSTART)
    assert resolve_engine(plain, 1).name == "plain" and resolve_engine(plain, 2).name == "ddp"
    zero2 = load_recipe(QUICKSTART, ["distributed.deepspeed_config=configs/deepspeed/zero2.json"])
    assert resolve_engine(zero2, 2).reduce_bucket_elems == 500_000_000  # DeepSpeed's default, fp32: 1.9 GiB
    overlap = load_recipe(QUICKSTART, [_ds_json(tmp_path, {"stage": 2, "overlap_comm": True,
                                                            "reduce_bucket_size": 10**6})])
    assert resolve_engine(overlap, 2).reduce_bucket_elems == 2 * 10**6
    no_bucket = load_recipe(QUICKSTART, [_ds_json(tmp_path, {"stage": 1, "contiguous_gradients": False})])
    assert resolve_engine(no_bucket, 2).name == "zero1" and resolve_engine(no_bucket, 2).reduce_bucket_elems == 0
    with pytest.raises(ConfigError, match="--engine"):
        resolve_engine(plain, 2, "plain")


def test_engines_not_in_this_checkout_are_marked_on_paper():
    from qtrain.distributed import deepspeed_config as ds

    recipe = load_recipe(QUICKSTART)
    assert resolve_engine(recipe, 2, "zero2").landed
    assert resolve_engine(recipe, 2, "zero3").landed == (3 in ds.SUPPORTED_STAGES)


def test_storage_tracker_counts_storages_once_and_frees_them():
    with StorageTracker("cpu") as tracker:
        a = torch.zeros(1000)              # 4000 bytes
        view = a[10:20]                    # same storage
        a.add_(1)                          # in place: nothing new
        b = a * 2                          # 4000 more
        assert tracker.current == 8000
        del a, b
        assert tracker.current == 4000     # the view keeps the first storage alive
        del view
        c = torch.zeros(10, dtype=torch.float64)
    assert tracker.current == 80 and tracker.peak == 8000
    del c
    assert tracker.current == 0


def test_the_fused_loss_is_planned_only_for_a_head_the_trainer_fuses(tmp_path):
    """The plan counts the fused linear + cross-entropy where the trainer runs it (models.arch.plain_lm_head):
    a softcapped head keeps the logits path in both."""
    from qtrain.models.arch import plain_lm_head
    from qtrain.plan.model_shape import _skeleton, transformers_config
    from qtrain.plan.settings import settings_from_recipe
    from qtrain.plan.target import Target

    for over, fused in [([], True), (["model.from_config.final_logit_softcapping=30.0"], False)]:
        recipe = load_recipe(QUICKSTART, [f"output_dir={tmp_path}", *over])
        assert plain_lm_head(_skeleton(transformers_config(recipe), False)) is fused
        assert settings_from_recipe(recipe, Target("cpu", 1)).fused_ce is fused, over
