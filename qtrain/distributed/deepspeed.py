"""DeepSpeed ZeRO-1/2/3: the only module that imports `deepspeed` (lazily).

The config comes from the recipe (see deepspeed_config.py). qtrain keeps its own semantics: the
token-weighted global loss, its LR schedule (stepped only when DeepSpeed applied the step), and
its checkpoint format (each rank saves its optimizer partition as an extra file of the step).

ZeRO-3 partitions the 4-bit base too. Its NF4 weights are uint8 parameters, one row per
quantization block (see `NF4Weight`); ZeRO-3 partitions each parameter in its own dtype and
broadcasts/gathers them as bytes (measured: the bytes come back exact, NaN/inf bit patterns
included), and a block count padded to a multiple of the world size makes every partition whole
blocks. Loading: each rank quantizes only its rows (`row_shard`); `wrap` then gathers one tensor
at a time and hands it to `deepspeed.zero.Init(module=...)`, which keeps this rank's partition
and frees the rest, so a rank never holds more than its share plus one tensor. The frozen token
embeddings and LM head go in as row parts of at most a decoder block's bytes (`vocab_parts`), so
neither loading nor any forward or backward gathers a whole vocabulary matrix (measured on the 1B
CPU benchmark at 2 ranks, with the embedding fix of train/setup.py: peak RSS per rank 2140 -> 1805 MiB,
loading 1987 -> 1329 MiB). The forwards of
`LoRALinear` and `NF4Linear` read their children's parameters directly, so those are registered
as the layer's external parameters: ZeRO-3 then gathers them before the layer's forward and
backward (gradient-checkpointing recompute included) and frees them after.

ZeRO-3's gather budgets (prefetch, live parameters, reuse distance) default to one and two
decoder blocks and release-after-use when the JSON leaves them out (`with_stage3_budgets`);
DeepSpeed's own defaults keep a model under 1e9 elements gathered from forward to backward.

The saved adapter is always whole: `whole_trainable` gathers it inside qtrain, so nothing
depends on `stage3_gather_16bit_weights_on_model_save`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qtrain.checkpoint.train_state import required_files
from qtrain.checkpoint.tree import flatten, unflatten
from qtrain.config.schema import Recipe
from qtrain.distributed import collectives
from qtrain.distributed.deepspeed_config import build_config, config_stage, with_stage3_budgets
from qtrain.distributed.engine import (MakeOptimizer, StepOutcome, check_whole, local_shards, repeated_blocks,
                                      trainable)
from qtrain.distributed.env import DistEnv
from qtrain.distributed.plain import PlainEngine
from qtrain.distributed.vocab_parts import PartedEmbedding, PartedLinear, row_ranges, splittable
from qtrain.errors import CheckpointError, ConfigError
from qtrain.peft.lora import LoRALinear
from qtrain.quant.linear import NF4Linear
from qtrain.quant.shard import RowShard, full_shape


# Where ZeRO-3's state_dict() keeps the client optimizer's state.
_INNER = "optimizer_state_dict"


class DeepSpeedEngine(PlainEngine):
    name = "deepspeed"
    owns_forward = True
    reshards = False  # each rank's optimizer partition is a slice of ZeRO's flat buffers
    supports_loss_scaling = False  # DeepSpeed would need its own fp16 section; qtrain's autocast owns precision

    def __init__(self, recipe: Recipe, env: DistEnv) -> None:
        super().__init__(recipe, env)
        self.config = build_config(recipe, env.world_size)
        self.stage = config_stage(self.config)
        self.engine = None

    @property
    def gathers_parameters(self) -> bool:
        return self.stage == 3

    def row_shard(self) -> RowShard:
        if self.stage < 3:
            return RowShard()
        return RowShard(self.env.rank, self.env.world_size, collectives.all_gather)

    def wrap(self, model: nn.Module, make_optimizer: MakeOptimizer) -> torch.optim.Optimizer:
        """The DeepSpeed engine around `model`, with qtrain's optimizer as its client optimizer."""
        import deepspeed
        from deepspeed.utils import logger

        logger.setLevel(logging.WARNING)
        init_process_group(self.recipe.distributed.timeout_s)
        if self.stage == 3:
            block = largest_block_numel(model)
            if block is not None:  # else DeepSpeed's own budgets
                self.config = with_stage3_budgets(self.config, block)
            _partition_base(model, self.config, largest_block_bytes(model))
        self.optimizer = make_optimizer(trainable(model))
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.config)
        if self.stage == 3:
            _register_direct_reads(model)
        self.model, self.forward_model = model, self.engine
        return self.optimizer

    def backward(self, loss: torch.Tensor, scaler=None) -> None:
        """DeepSpeed's backward (no extra 1/GAS: qtrain's loss already weights the tokens of the
        whole step) and its step, which applies the update only at the accumulation boundary;
        there ZeRO averages gradients over ranks, clips, and skips the update (zeroing the
        gradients) when any rank's gradients are non-finite."""
        if scaler is not None and scaler.enabled:  # refused at setup (supports_loss_scaling)
            raise ConfigError("fp16 loss scaling is not supported under DeepSpeed yet; use bf16 or fp32")
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def step(self, loss_finite: bool, scaler=None) -> StepOutcome:
        """DeepSpeed's step already ran at the boundary: report its norm and whether it applied."""
        norm = self.engine.get_global_grad_norm()
        norm = float("inf") if norm is None else float(norm)
        return StepOutcome(norm, bool(self.engine.was_step_applied()) and loss_finite)

    @contextlib.contextmanager
    def whole_trainable(self, modify: bool = False):
        if self.stage < 3:
            with super().whole_trainable(modify):
                yield
            return
        import deepspeed

        # modifier_rank 0: on exit, rank 0's values are broadcast and partitioned again.
        with deepspeed.zero.GatheredParameters(trainable(self.model), modifier_rank=0 if modify else None):
            check_whole(self.model)
            yield

    # -- checkpoints ---------------------------------------------------------------------
    def checkpoint_files(self, method: str) -> list[str]:
        return required_files(self.env.world_size, method) + shard_files(self.env.world_size)

    def optimizer_record(self) -> ShardedOptimizer:
        return ShardedOptimizer(self.stage, self.env.world_size)

    def save_state(self, tmp: Path) -> None:
        """This rank's partition of the optimizer state: the client optimizer's state over ZeRO's
        flat fp32 partition (ZeRO-3 hands it out only through its own state_dict)."""
        zero = self.engine.optimizer
        state = zero.state_dict()[_INNER] if self.stage == 3 else zero.optimizer.state_dict()
        tree, tensors = flatten(state, "optimizer")
        save_file(tensors, str(tmp / shard_file(self.env.rank)), metadata={"tree": json.dumps(tree)})

    def load_state(self, ckpt: Path) -> None:
        """After the adapter weights are loaded into the model: refresh ZeRO's fp32 master partition
        from them (bit-exact in fp32) and load this rank's optimizer state partition."""
        path = ckpt / shard_file(self.env.rank)
        try:
            with safe_open(str(path), framework="pt") as fh:
                state = unflatten(json.loads(fh.metadata()["tree"]), {k: fh.get_tensor(k) for k in fh.keys()})
        except Exception as exc:  # noqa: BLE001 - corrupt files raise many types
            raise CheckpointError(f"{path}: cannot read ({exc})") from None
        zero = self.engine.optimizer
        zero.refresh_fp32_params()
        try:
            if self.stage == 3:
                # ZeRO-3 loads its client optimizer only through its own load_state_dict (one entry
                # per rank); everything else in that dict is what it holds now.
                whole = {**zero.state_dict(), _INNER: state}
                zero.load_state_dict([whole] * self.env.world_size)
            else:
                zero.optimizer.load_state_dict(state)
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: does not fit this run's optimizer partition ({exc}); "
                                  "resume with the recipe and number of processes that wrote it") from None

    # -- sizes ---------------------------------------------------------------------------
    def numel(self, p: torch.Tensor) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    def local_bytes(self, p: torch.Tensor) -> int:
        held = getattr(p, "ds_tensor", None)
        held = p if held is None else held
        return held.numel() * held.element_size()


def init_process_group(timeout_s: float) -> None:
    """DeepSpeed's communication layer, over the launcher's torch process group when there is one
    (a single-process DeepSpeed run still needs a group; launchers set its address)."""
    import deepspeed

    try:
        deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s), auto_mpi_discovery=False,
                                   verbose=False)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"distributed.engine: DeepSpeed needs a launcher (deepspeed or torchrun): {exc}") from None


def _partition_base(model: nn.Module, config: dict, part_bytes: Optional[int]) -> None:
    """Hand the loaded local shards to ZeRO-3 one tensor at a time: gather the whole tensor (ZeRO's
    conversion takes it whole from rank 0) straight into one buffer, let `zero.Init` keep this
    rank's partition; a rank holds its share plus one whole tensor (and its local rows) at a time.

    The frozen token embeddings and LM head go in as row parts of at most `part_bytes` each
    (`vocab_parts`), one gathered at a time here and in every forward and backward after."""
    vocab = _vocab_modules(model)
    shards = local_shards(model)
    while shards:  # each local shard is released as soon as it is handed over
        owners, local, shape = shards.pop()
        if part_bytes is not None and owners and all(id(mod) in vocab for mod, _ in owners):
            bounds = row_ranges(shape[0], shape[1:].numel() * local.element_size(), part_bytes)  # same on every rank
            parts = [_zero_param(collectives.gather_row_range(local, shape[0], lo, hi), config) for lo, hi in bounds]
            for mod, _ in owners:
                parted = PartedEmbedding if isinstance(mod, nn.Embedding) else PartedLinear
                vocab.pop(id(mod))(parted(parts, bounds, shape[1]))
            del owners, local, mod  # the replaced module and its local rows go now
        else:
            rows = collectives.gather_row_range(local, shape[0], 0, shape[0])
            del local  # (the owners still hold it until _zero_param registers the whole one)
            _zero_param(rows, config, owners)
            del owners, rows


def _zero_param(rows: torch.Tensor, config: dict, owners: list[tuple[nn.Module, str]] = ()) -> nn.Parameter:
    """`rows` as a frozen parameter registered under `owners`, partitioned by `zero.Init` (which keeps
    this rank's partition and frees the rest)."""
    import deepspeed

    param = nn.Parameter(rows, requires_grad=False)
    del rows
    for mod, leaf in owners:
        mod._parameters[leaf] = param
    holder = nn.Module()
    holder.register_parameter("whole", param)
    deepspeed.zero.Init(module=holder, config_dict_or_path=config, mem_efficient_linear=False)
    return param


def _vocab_modules(model: nn.Module) -> dict[int, Callable[[nn.Module], None]]:
    """id -> setter of the model's token embeddings and LM head where `splittable`."""
    found = {}
    for get, set_ in (("get_input_embeddings", "set_input_embeddings"), ("get_output_embeddings", "set_output_embeddings")):
        try:
            mod = getattr(model, get)()
        except (AttributeError, NotImplementedError):
            continue
        if mod is not None and splittable(mod) and hasattr(model, set_):
            found[id(mod)] = getattr(model, set_)
    return found


def largest_block_numel(model: nn.Module) -> Optional[int]:
    """Elements of the largest decoder block's parameters, whole (a row-sharded tensor counts in full);
    None for a model that names no block class (transformers' `_no_split_modules`)."""
    return _largest_block(model, lambda p: 1)


def largest_block_bytes(model: nn.Module) -> Optional[int]:
    """`largest_block_numel` in bytes."""
    return _largest_block(model, lambda p: p.element_size())


def _largest_block(model: nn.Module, unit: Callable[[torch.Tensor], int]) -> Optional[int]:
    def whole(p: torch.Tensor) -> int:
        shape = full_shape(p)
        return (p.numel() if shape is None else shape.numel()) * unit(p)

    return max((sum(whole(p) for p in block.parameters()) for block in repeated_blocks(model)), default=None)


def _register_direct_reads(model: nn.Module) -> None:
    """LoRALinear and NF4Linear read their children's parameters without calling the children:
    register those as the layer's own, so ZeRO-3 gathers them around the layer's forward/backward."""
    import deepspeed

    for mod in model.modules():
        if isinstance(mod, (LoRALinear, NF4Linear)):
            for name, p in mod.named_parameters():
                if "." in name:  # a descendant's, not the layer's own
                    deepspeed.zero.register_external_parameter(mod, p)


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
