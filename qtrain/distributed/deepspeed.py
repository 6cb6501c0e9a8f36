"""DeepSpeed ZeRO-1/2 data parallelism: the only module that imports `deepspeed` (lazily).

The DeepSpeed config is generated from the recipe (batch sizes, accumulation, clipping, mixed
precision); a user JSON (`distributed.deepspeed_config`) may add ZeRO settings and may repeat a
recipe-owned key only with the same value. qtrain keeps its own semantics: the token-weighted
global loss, its LR schedule (stepped here only when DeepSpeed applied the step), and its
checkpoint format (each rank saves its optimizer partition as an extra file of the same step).

ZeRO-3 is refused: it partitions `nn.Parameter`s, but the NF4 base is stored as uint8 buffers
that stay replicated on every rank, and the adapter it could partition is a fraction of a
percent of the model; ZeRO-2 already partitions the adapter's gradients and optimizer state.
"""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qtrain.checkpoint.tree import flatten, unflatten
from qtrain.config.schema import Recipe
from qtrain.errors import CheckpointError, ConfigError

SUPPORTED_STAGES = (1, 2)
# bitsandbytes' 8-bit AdamW steps ZeRO's flat fp32 partition like any tensor (tested on CPU);
# paged optimizers page their own state, which ZeRO's partitioned buffers were never tested with.
SUPPORTED_OPTIMIZERS = ("adamw", "adamw_8bit")
# Keys the recipe owns; DeepSpeed must never run its own optimizer or schedule next to qtrain's.
FORBIDDEN_KEYS = {"optimizer": "train.optimizer / train.lr / train.weight_decay",
                  "scheduler": "train.schedule / train.warmup_steps"}

_STAGE3_WHY = (
    "ZeRO-3 partitions nn.Parameters, but the 4-bit (NF4) base is stored as uint8 buffers, so every "
    "rank would still hold the whole base and only the tiny LoRA adapter would be partitioned: no "
    "memory saved, more communication. The 4-bit base is small and replicated (about 0.5 byte per "
    "parameter: ~5.7 GB at 8B), and ZeRO-2 already partitions the adapter's gradients and optimizer "
    "state. Use configs/deepspeed/zero2.json")


def enabled(recipe: Recipe) -> bool:
    """`engine: deepspeed`, or `auto` with a DeepSpeed config (no import of deepspeed here)."""
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
    zero = user.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage == 3:
        raise ConfigError(f"{path}: zero_optimization.stage 3 is not supported with a QLoRA base. {_STAGE3_WHY}")
    if stage not in SUPPORTED_STAGES:
        raise ConfigError(f"{path}: zero_optimization.stage must be 1 or 2, got {stage!r} "
                          "(for plain data parallelism use distributed.engine: ddp)")
    if recipe.train.optimizer not in SUPPORTED_OPTIMIZERS:
        raise ConfigError(f"train.optimizer: {recipe.train.optimizer!r} is not supported under DeepSpeed (its paged "
                          "state was never tested with ZeRO's partitioned buffers); use one of "
                          f"{', '.join(SUPPORTED_OPTIMIZERS)}")
    return {**user, **derived}


def init_process_group(timeout_s: float) -> None:
    """A single-process DeepSpeed run still needs a process group (launchers set its address)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    import deepspeed

    try:
        deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s), auto_mpi_discovery=False,
                                   verbose=False)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"distributed.engine: DeepSpeed needs a launcher (deepspeed or torchrun): {exc}") from None


def wrap(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict, timeout_s: float):
    """The DeepSpeed engine around `model`, with qtrain's optimizer as its client optimizer."""
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    init_process_group(timeout_s)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def backward_and_step(engine, scaled_loss: torch.Tensor) -> None:
    """One micro-batch: DeepSpeed's backward (no extra 1/GAS: qtrain's loss already weights the
    tokens of the whole step) and its step, which applies the update only at the accumulation
    boundary; there ZeRO averages gradients over ranks, clips, and skips the update (zeroing
    the gradients) when any rank's gradients are non-finite."""
    engine.backward(scaled_loss, scale_wrt_gas=False)
    engine.step()


def step_outcome(engine) -> tuple[float, bool]:
    """(pre-clip global gradient norm, whether the optimizer step was applied) of the last boundary."""
    norm = engine.get_global_grad_norm()
    return (float("inf") if norm is None else float(norm)), bool(engine.was_step_applied())


def check_adapter_whole(model: nn.Module) -> None:
    """Refuse to save an adapter whose parameters are partitioned (a ZeRO-3 leftover) or empty."""
    for name, p in model.named_parameters():
        if p.requires_grad and (hasattr(p, "ds_tensor") or p.numel() == 0):
            raise CheckpointError(f"refusing to save a partitioned adapter: {name} holds {p.numel()} of its values")


class ShardedOptimizer:
    """Stands in for the optimizer in the shared checkpoint files: under ZeRO each rank's state
    is a partition, saved by that rank as `zero-optimizer-rank-R.safetensors`; this records the
    layout, and loading it into a run with another layout is refused (ValueError)."""

    def __init__(self, stage: int, world_size: int) -> None:
        self.layout = {"zero_stage": stage, "world_size": world_size, "files": shard_file(-1)}

    def state_dict(self) -> dict:
        return dict(self.layout)

    def load_state_dict(self, state: dict) -> None:
        if state != self.layout:
            raise ValueError(f"checkpoint optimizer layout {state!r}, this run needs {self.layout!r}")


def shard_file(rank: int) -> str:
    return f"zero-optimizer-rank-{'R' if rank < 0 else rank}.safetensors"


def shard_files(world_size: int) -> list[str]:
    return [shard_file(r) for r in range(world_size)]


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def save_optimizer_shard(engine, tmp: Path, rank: int) -> None:
    """This rank's partition of the optimizer state (every rank calls this)."""
    tree, tensors = flatten(engine.optimizer.optimizer.state_dict(), "optimizer")
    save_file(tensors, str(tmp / shard_file(rank)), metadata={"tree": json.dumps(tree)})


def load_optimizer_shard(engine, ckpt: Path, rank: int) -> None:
    """After the adapter weights are loaded into the model: refresh ZeRO's fp32 master partition
    from them (bit-exact in fp32) and load this rank's optimizer state partition."""
    path = ckpt / shard_file(rank)
    try:
        with safe_open(str(path), framework="pt") as fh:
            state = unflatten(json.loads(fh.metadata()["tree"]), {k: fh.get_tensor(k) for k in fh.keys()})
    except Exception as exc:  # noqa: BLE001 - corrupt files raise many types
        raise CheckpointError(f"{path}: cannot read ({exc})") from None
    engine.optimizer.refresh_fp32_params()
    try:
        engine.optimizer.optimizer.load_state_dict(state)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: does not fit this run's optimizer partition ({exc}); "
                              "resume with the recipe and number of processes that wrote it") from None
