"""The Engine interface: how one run's model is placed, stepped, checkpointed and gathered.

The trainer (loop, checkpointing, resume, setup) calls only this interface; each case is one
class: `PlainEngine` (one process), `DDPEngine`, `FSDPEngine` (torch FSDP2), `DeepSpeedEngine`
(ZeRO-1/2/3). `create_engine` picks one from the recipe and the launcher's environment, and it
is the only place that does.

What an engine owns, in the order a run uses it:
- `row_shard()`: which rows of the frozen base this rank loads (all of them unless the engine
  shards the base);
- `wrap(model, make_optimizer)`: place the model (wrap, shard) and build the optimizer over the
  parameters the engine trains, in the order the engine needs;
- `accumulating(last)`, `backward(loss)`, `step(loss_finite)`: one optimizer step over several
  micro-batches; `step` returns the pre-clip global gradient norm and whether the update was
  applied (a non-finite loss or gradient on any rank skips it on every rank);
- `all_reduce_sum`, `any_rank`, `barrier`: the collectives the loop needs;
- `whole_trainable(modify)`: a context in which the trainable parameters are whole tensors on
  the model (saving and loading adapters), whatever the engine shards;
- `save_state` / `load_state` / `checkpoint_files` / `optimizer_record` / `check_resume`: the
  engine's part of a checkpoint, inside the atomic commit protocol of `qtrain.checkpoint.store`.

Mixed precision is qtrain's own autocast; fp16 loss scaling is a `LossScaler`
(qtrain.train.scaler: `scale`, `unscale`, `step(optimizer, apply)`) passed to `backward` and
`step`, which unscale before clipping; engines that do not run it say so
(`supports_loss_scaling`) and the run is refused before any work.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import torch
from torch import nn

from qtrain.config.schema import Recipe
from qtrain.distributed.env import DistEnv
from qtrain.errors import CheckpointError, ConfigError
from qtrain.quant.shard import RowShard, full_shape

MakeOptimizer = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class StepOutcome:
    grad_norm: float
    applied: bool


class Engine(abc.ABC):
    """The interface (see the module docstring); `PlainEngine` is the one-process implementation."""

    name: str
    # Whether forward/backward must go through the engine (wrapper or hooks): then nothing may
    # call a submodule or read a parameter directly during the step (the fused loss does).
    owns_forward: bool
    # Whether a checkpoint of another world size can be resumed (the optimizer state re-shards).
    reshards: bool
    # Whether `backward`/`step` run fp16 dynamic loss scaling (qtrain.train.scaler.LossScaler).
    supports_loss_scaling: bool
    # Whether each step gathers whole parameters from their shards and frees them again (FSDP,
    # ZeRO-3): the host allocator then serves them by mmap (qtrain.train.host_memory).
    gathers_parameters: bool
    model: nn.Module | None
    forward_model: nn.Module | None
    optimizer: torch.optim.Optimizer | None

    @abc.abstractmethod
    def row_shard(self) -> RowShard: ...

    @abc.abstractmethod
    def wrap(self, model: nn.Module, make_optimizer: MakeOptimizer) -> torch.optim.Optimizer: ...

    @abc.abstractmethod
    def accumulating(self, last: bool) -> ContextManager: ...

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor, scaler=None) -> None: ...

    @abc.abstractmethod
    def step(self, loss_finite: bool, scaler=None) -> StepOutcome: ...

    @abc.abstractmethod
    def all_reduce_sum(self, values: list[float]) -> list[float]: ...

    @abc.abstractmethod
    def any_rank(self, flag: bool) -> bool: ...

    @abc.abstractmethod
    def barrier(self) -> None: ...

    @abc.abstractmethod
    def whole_trainable(self, modify: bool = False) -> ContextManager: ...

    @abc.abstractmethod
    def checkpoint_files(self, method: str) -> list[str]: ...

    @abc.abstractmethod
    def optimizer_record(self): ...

    @abc.abstractmethod
    def save_state(self, tmp: Path) -> None: ...

    @abc.abstractmethod
    def load_state(self, ckpt: Path) -> None: ...

    @abc.abstractmethod
    def check_resume(self, saved: dict) -> None: ...

    @abc.abstractmethod
    def numel(self, p: torch.Tensor) -> int: ...

    @abc.abstractmethod
    def nf4_bytes(self, model: nn.Module) -> int: ...


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated (decoder) blocks, by transformers' `_no_split_modules` (what device maps
    keep whole); empty for a model that names none."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def local_shards(model: nn.Module) -> list[tuple[list[tuple[nn.Module, str]], torch.Tensor, torch.Size]]:
    """Every parameter the loader kept only this rank's rows of (see `RowShard`), once each:
    (where it is registered — tied names share it —, its rows, the whole tensor's shape)."""
    groups: dict[int, tuple[list[tuple[nn.Module, str]], torch.Tensor, torch.Size]] = {}
    for mod in model.modules():
        for leaf, p in mod._parameters.items():
            if p is not None and full_shape(p) is not None:
                groups.setdefault(id(p), ([], p.detach(), full_shape(p)))[0].append((mod, leaf))
    return list(groups.values())


def check_whole(model: nn.Module) -> None:
    """Refuse to save an adapter whose parameters are partitioned or empty (a ZeRO-3 or FSDP leftover)."""
    for name, p in model.named_parameters():
        if p.requires_grad and p.numel() == 0:
            raise CheckpointError(f"refusing to save a partitioned adapter: {name} holds {p.numel()} of its values")


def check_resume_compatible(saved: dict, engine: str, reshards: bool, world_size: int, micro_batch: int) -> None:
    """The checkpoint's trainer state against this run: same engine family; the same number of
    processes unless the engine re-shards; the same global micro-batch (the data position counts
    global micro-batches)."""
    saved_engine = saved.get("engine")
    saved_world = int(saved.get("world_size", world_size))
    if saved_engine is not None and _state_format(saved_engine) != _state_format(engine):
        raise CheckpointError(f"the checkpoint was written under distributed.engine: {saved_engine} and this run uses "
                              f"{engine}; their optimizer states are stored differently: resume with "
                              f"distributed.engine: {saved_engine}")
    if saved_world != world_size and not reshards:
        raise CheckpointError(f"the checkpoint was written by {saved_world} processes and its optimizer state is "
                              f"partitioned for {saved_world}; resume with {saved_world} processes (or train under "
                              "distributed.engine: fsdp, whose checkpoints re-shard to any number of processes)")
    saved_global = saved.get("global_micro_batch")
    if saved_global is not None and saved_global != micro_batch * world_size:
        raise CheckpointError(f"the checkpoint was written with {saved_world} processes x micro-batch "
                              f"{saved_global // max(1, saved_world)} = {saved_global} sequences per micro-batch; with "
                              f"{world_size} processes set train.micro_batch_size={saved_global / world_size:g} so that "
                              "the data order continues where it stopped")


def _state_format(engine: str) -> str:
    """How an engine stores optimizer state: FSDP (DCP shards), DeepSpeed (ZeRO partitions), or whole."""
    return engine if engine in ("fsdp", "deepspeed") else "whole"


def engine_kind(recipe: Recipe, env: DistEnv) -> str:
    """plain | ddp | fsdp | deepspeed, from `distributed.engine` and the number of processes."""
    d = recipe.distributed
    if d.engine == "deepspeed" or (d.engine == "auto" and d.deepspeed_config is not None):
        return "deepspeed"
    if d.engine == "plain" and env.world_size > 1:
        # Each rank would train its own unsynchronized adapter.
        raise ConfigError(f"distributed.engine: 'plain' is single-process, but {env.world_size} processes were "
                          "launched; use 'auto', 'ddp' or 'fsdp'")
    if d.engine in ("ddp", "fsdp", "plain"):
        return d.engine
    return "ddp" if env.world_size > 1 else "plain"


def create_engine(recipe: Recipe, env: DistEnv) -> Engine:
    """The engine for this run; typed errors for impossible combinations before any work."""
    kind = engine_kind(recipe, env)
    if kind == "deepspeed":
        from qtrain.distributed.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(recipe, env)
    if kind == "fsdp":
        from qtrain.distributed.fsdp import FSDPEngine

        return FSDPEngine(recipe, env)
    if kind == "ddp":
        from qtrain.distributed.ddp import DDPEngine

        return DDPEngine(recipe, env)
    from qtrain.distributed.plain import PlainEngine

    return PlainEngine(recipe, env)
