"""Engine choice, the typed refusals of impossible engine settings, and resume compatibility."""

import json

import pytest
import torch

from qtrain.cli import _parse
from qtrain.config.schema import Recipe
from qtrain.config.validate import check_values
from qtrain.distributed.deepspeed_config import build_config
from qtrain.distributed.engine import check_resume_compatible, engine_kind
from qtrain.distributed.env import DistEnv
from qtrain.errors import CheckpointError, ConfigError


def _recipe(**distributed) -> Recipe:
    r = Recipe(output_dir="out")
    r.model.from_config, r.model.tokenizer, r.data.path = {"model_type": "llama"}, "tok", "d.jsonl"
    for k, v in distributed.items():
        setattr(r.distributed, k, v)
    return r


@pytest.mark.parametrize("engine,config,world,kind", [
    ("auto", None, 1, "plain"), ("auto", None, 2, "ddp"), ("auto", "z.json", 2, "deepspeed"),
    ("fsdp", None, 1, "fsdp"), ("fsdp", None, 4, "fsdp"), ("ddp", None, 1, "ddp"), ("deepspeed", "z.json", 1, "deepspeed"),
])
def test_engine_kind_from_recipe_and_launch(engine, config, world, kind):
    assert engine_kind(_recipe(engine=engine, deepspeed_config=config), DistEnv(0, 0, world)) == kind


def test_plain_engine_with_several_processes_is_refused():
    with pytest.raises(ConfigError, match="'plain' is single-process, but 2 processes"):
        engine_kind(_recipe(engine="plain"), DistEnv(0, 0, 2))


def test_fsdp_with_a_deepspeed_config_is_refused_naming_the_key():
    problems = check_values(_recipe(engine="fsdp", deepspeed_config="configs/deepspeed/zero3.json"))
    assert any(p.startswith("distributed.deepspeed_config: set, but distributed.engine is 'fsdp'") for p in problems)


@pytest.mark.parametrize("optimizer", ["paged_adamw", "paged_adamw_8bit", "adamw_8bit"])
def test_fsdp_refuses_bitsandbytes_optimizers_naming_what_works(optimizer):
    r = _recipe(engine="fsdp")
    r.train.optimizer = optimizer
    problems = check_values(r)
    assert any(p.startswith(f"train.optimizer: '{optimizer}' is not supported under distributed.engine: fsdp")
               and "use adamw" in p for p in problems), problems


def test_full_fine_tuning_is_refused_under_fsdp():
    r = _recipe(engine="fsdp")
    r.peft.method, r.quant.method = "full", "none"
    assert any("'full' is not supported under FSDP" in p for p in check_values(r))


@pytest.mark.parametrize("key,value", [
    ("zero_quantized_weights", True), ("zero_quantized_nontrainable_weights", True),
    ("offload_param", {"device": "cpu"}), ("zero_hpz_partition_size", 2), ("mics_shard_size", 2),
])
def test_zero3_keys_that_contradict_the_recipe_are_named(tmp_path, key, value):
    path = tmp_path / "z3.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, key: value}}))
    r = _recipe(engine="deepspeed", deepspeed_config=str(path))
    r.train.optimizer = "adamw"
    with pytest.raises(ConfigError, match=f"zero_optimization.{key} is .*remove it from the JSON"):
        build_config(r, 2)
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))  # the same JSON without it builds
    assert build_config(r, 2)["zero_optimization"] == {"stage": 3}


def test_zero3_json_cannot_change_what_the_recipe_owns(tmp_path):
    path = tmp_path / "z3.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}))
    r = _recipe(engine="deepspeed", deepspeed_config=str(path))
    r.train.optimizer = "adamw"
    with pytest.raises(ConfigError, match="'bf16' is .* but the recipe gives"):
        build_config(r, 2)


SAVED = {"engine": "deepspeed", "world_size": 2, "global_micro_batch": 4}


def test_a_zero_checkpoint_resumes_only_on_its_number_of_processes():
    check_resume_compatible(SAVED, "deepspeed", False, 2, 2)
    with pytest.raises(CheckpointError, match="written by 2 processes .* resume with 2 processes .*fsdp"):
        check_resume_compatible(SAVED, "deepspeed", False, 1, 4)


def test_a_resharding_engine_needs_the_same_global_micro_batch():
    fsdp = {**SAVED, "engine": "fsdp"}
    check_resume_compatible(fsdp, "fsdp", True, 1, 4)
    check_resume_compatible(fsdp, "fsdp", True, 4, 1)
    with pytest.raises(CheckpointError, match="set train.micro_batch_size=4 "):
        check_resume_compatible(fsdp, "fsdp", True, 1, 2)


def test_a_checkpoint_is_resumed_only_by_an_engine_that_stores_the_optimizer_alike():
    with pytest.raises(CheckpointError, match="written under distributed.engine: fsdp .* resume with distributed.engine: fsdp"):
        check_resume_compatible({**SAVED, "engine": "fsdp"}, "ddp", True, 2, 2)
    with pytest.raises(CheckpointError, match="resume with distributed.engine: deepspeed"):
        check_resume_compatible(SAVED, "fsdp", True, 2, 2)
    check_resume_compatible({**SAVED, "engine": "ddp"}, "plain", True, 1, 4)  # whole optimizer state: fine
    check_resume_compatible({"world_size": 2}, "ddp", True, 2, 2)  # checkpoints from before these keys


@pytest.mark.parametrize("argv", [
    ["--local_rank=1", "train", "r.yaml", "a=b"], ["train", "r.yaml", "--local_rank", "1", "a=b"],
    ["--local-rank=0", "train", "r.yaml", "a=b"],
])
def test_the_cli_ignores_the_launchers_local_rank_argument(argv):
    args = _parse(argv)
    assert (args.command, args.recipe, args.overrides) == ("train", "r.yaml", ["a=b"])


@pytest.mark.parametrize("method", ["dora", "ia3", "freeze", "prompt_tuning"])
def test_methods_other_than_lora_are_refused_over_a_sharded_base(tmp_path, method):
    """Only LoRA is tested over a base sharded across ranks (FSDP, ZeRO-3); the others run under DDP and ZeRO-1/2."""
    r = _recipe(engine="fsdp")
    r.peft.method = method
    assert any(f"peft.method: '{method}' is not supported under FSDP yet" in p for p in check_values(r))
    path = tmp_path / "z.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    r = _recipe(engine="deepspeed", deepspeed_config=str(path))
    r.peft.method, r.train.optimizer = method, "adamw"
    with pytest.raises(ConfigError, match=f"peft.method: '{method}' is not supported under ZeRO-3 yet"):
        build_config(r, 2)
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert build_config(r, 2)["zero_optimization"]["stage"] == 2
    assert not any("is not supported under FSDP" in p for p in check_values(_recipe(engine="fsdp")))


@pytest.mark.parametrize("tied", [False, True])
def test_fsdp_gives_untied_embeddings_units_of_their_own(tied):
    """Untied: the input embedding and lm_head are sharded units (gathered only around their use);
    tied: one weight in two modules stays in the root unit, where FSDP2 keeps a shared weight whole."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qtrain.distributed.fsdp import embedding_units

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg)
    units = embedding_units(model)
    if tied:
        assert units == []
    else:
        assert units == [model.model.embed_tokens, model.lm_head]
    assert embedding_units(torch.nn.Linear(2, 2)) == []  # not a transformers model: no embeddings to find


def test_zero3_gather_budgets_come_from_the_largest_block_and_the_json_wins(tmp_path):
    """Left out of the JSON, ZeRO-3's prefetch / live / reuse budgets are one block, two blocks and 0
    (release after use); a row-sharded tensor counts whole; a key the user set is kept as set."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qtrain.distributed.deepspeed import largest_block_numel
    from qtrain.distributed.deepspeed_config import with_stage3_budgets
    from qtrain.quant.shard import mark_full_shape

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64)
    model = LlamaForCausalLM(cfg)
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    assert largest_block_numel(model) == block
    q = model.model.layers[1].self_attn.q_proj
    whole = q.weight.shape
    q.weight = torch.nn.Parameter(q.weight.detach()[:8].clone())  # this rank's rows of a 16-row tensor
    mark_full_shape(q.weight, tuple(whole))
    assert largest_block_numel(model) == block
    assert largest_block_numel(torch.nn.Linear(2, 2)) is None  # names no block class: DeepSpeed's own budgets

    path = tmp_path / "z3.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_max_reuse_distance": 5}}))
    r = _recipe(engine="deepspeed", deepspeed_config=str(path))
    r.train.optimizer = "adamw"
    zero = with_stage3_budgets(build_config(r, 2), block)["zero_optimization"]
    assert zero == {"stage": 3, "stage3_prefetch_bucket_size": block, "stage3_max_live_parameters": 2 * block,
                    "stage3_max_reuse_distance": 5}
