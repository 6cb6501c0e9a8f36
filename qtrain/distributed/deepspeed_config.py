"""The DeepSpeed config: generated from the recipe, plus the ZeRO settings of a user JSON.

The recipe owns batch sizes, accumulation, clipping, mixed precision, the optimizer, the
schedule and the base's quantization; a user JSON (`distributed.deepspeed_config`) adds ZeRO
settings and may repeat a recipe-owned key only with the same value. Everything else is a
ConfigError naming the key and the fix, raised before any work. Nothing here imports deepspeed.
"""

from __future__ import annotations

import json
from pathlib import Path

from qtrain.config.methods import METHOD_RULES
from qtrain.config.schema import Recipe
from qtrain.errors import ConfigError

SUPPORTED_STAGES = (1, 2, 3)
# bitsandbytes' 8-bit AdamW steps ZeRO's flat fp32 partition like any tensor (tested on CPU);
# paged optimizers page their own state, which ZeRO's partitioned buffers were never tested with.
SUPPORTED_OPTIMIZERS = ("adamw", "adamw_8bit")
# Keys the recipe owns; DeepSpeed must never run its own optimizer or schedule next to qtrain's.
FORBIDDEN_KEYS = {"optimizer": "train.optimizer / train.lr / train.weight_decay",
                  "scheduler": "train.schedule / train.warmup_steps"}
# zero_optimization keys that contradict the recipe or qtrain's sharded checkpoints:
# key -> (the values that do nothing, why any other value is refused).
STAGE3_REFUSED = {
    "zero_quantized_weights": ((None, False), "the recipe's quant section owns the base's quantization: "
                               "DeepSpeed would quantize the NF4 bytes again"),
    "zero_quantized_nontrainable_weights": ((None, False), "the recipe's quant section owns the base's "
                                            "quantization: DeepSpeed would quantize the frozen NF4 bytes again"),
    "offload_param": ((None, {"device": "none"}), "the NF4 partitions stay on the device (parameter offload is "
                      "not supported with a 4-bit base)"),
    "zero_hpz_partition_size": ((None, 1), "qtrain partitions over all processes (hierarchical partitioning is "
                                "not supported)"),
    "mics_shard_size": ((None, -1), "qtrain partitions over all processes (MiCS sub-groups are not supported)"),
}


def enabled(recipe: Recipe) -> bool:
    """`engine: deepspeed`, or `auto` with a DeepSpeed config."""
    d = recipe.distributed
    return d.engine == "deepspeed" or (d.engine == "auto" and d.deepspeed_config is not None)


def read_user_config(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"distributed.deepspeed_config: cannot read {path} ({exc.strerror})") from None
    except ValueError as exc:
        raise ConfigError(f"distributed.deepspeed_config: {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"distributed.deepspeed_config: {path} must hold a JSON object")
    return data


def derived_config(recipe: Recipe, world_size: int) -> dict:
    """What the recipe decides: DeepSpeed gets these values and never a second copy of them."""
    t = recipe.train
    return {
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": float(t.grad_clip or 0.0),
        # Mixed precision is qtrain's own torch.autocast (train.autocast, model.dtype): DeepSpeed
        # must not cast the model or keep a second fp16/bf16 copy of the adapter.
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": t.optimizer != "adamw",
        "steps_per_print": 2**31 - 1,
    }


def _zero_stage(path: str, user: dict) -> int:
    zero = user.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in SUPPORTED_STAGES:
        raise ConfigError(f"{path}: zero_optimization.stage must be 1, 2 or 3, got {stage!r} "
                          "(for plain data parallelism use distributed.engine: ddp)")
    if stage == 3:
        for key, (inert, why) in STAGE3_REFUSED.items():
            if zero.get(key) not in inert:
                raise ConfigError(f"{path}: zero_optimization.{key} is {zero[key]!r}, but {why}; remove it from the JSON")
    return stage


def build_config(recipe: Recipe, world_size: int) -> dict:
    """The DeepSpeed config: the recipe's values plus the user's ZeRO settings; ConfigError on a conflict."""
    path = recipe.distributed.deepspeed_config
    if path is None:
        raise ConfigError("distributed.engine: 'deepspeed' needs distributed.deepspeed_config "
                          "(e.g. configs/deepspeed/zero2.json)")
    user = read_user_config(path)
    derived = derived_config(recipe, world_size)
    for key, owner in FORBIDDEN_KEYS.items():
        if key in user:
            raise ConfigError(f"{path}: '{key}' is set, but qtrain's recipe owns it ({owner}); remove it from the JSON")
    for key, value in derived.items():
        if key in user and user[key] != value:
            raise ConfigError(f"{path}: '{key}' is {user[key]!r}, but the recipe gives {value!r}; the recipe is "
                              "the one source of truth for batch sizes, accumulation, clipping and precision: "
                              "remove the key from the JSON or change the recipe")
    _zero_stage(path, user)
    if recipe.train.optimizer not in SUPPORTED_OPTIMIZERS:
        raise ConfigError(f"train.optimizer: {recipe.train.optimizer!r} is not supported under DeepSpeed (its paged "
                          "state was never tested with ZeRO's partitioned buffers); use one of "
                          f"{', '.join(SUPPORTED_OPTIMIZERS)}")
    config = {**user, **derived}
    if config_stage(config) == 3 and not METHOD_RULES[recipe.peft.method].sharded_base:
        raise ConfigError(f"peft.method: {recipe.peft.method!r} is not supported under ZeRO-3 yet (it shards the "
                          f"base; {path}); use a ZeRO-1/2 config such as configs/deepspeed/zero2.json (ZeRO-3 runs LoRA)")
    return config


def config_stage(config: dict) -> int:
    return int(config["zero_optimization"]["stage"])


def stage3_budgets(block_numel: int) -> dict:
    """ZeRO-3's gather budgets, in parameter elements (DeepSpeed's unit), that qtrain derives from the
    model when the JSON leaves them out: gather one decoder block ahead, hold at most two, release
    each after use (re-gathered for backward and for a checkpointed layer's recompute), so a rank
    holds its partition plus ~2 blocks. DeepSpeed's own defaults (max_live_parameters 1e9,
    max_reuse_distance 1e9) keep every gathered parameter of a model under 1e9 elements alive from
    its forward to its backward: each rank ends up holding the whole model next to its partition."""
    return {"stage3_prefetch_bucket_size": block_numel, "stage3_max_live_parameters": 2 * block_numel,
            "stage3_max_reuse_distance": 0}


def with_stage3_budgets(config: dict, block_numel: int) -> dict:
    """`config` with the budgets of `stage3_budgets` filled in where the user's JSON did not set them."""
    zero = dict(config["zero_optimization"])
    for key, value in stage3_budgets(block_numel).items():
        zero.setdefault(key, value)
    return {**config, "zero_optimization": zero}
