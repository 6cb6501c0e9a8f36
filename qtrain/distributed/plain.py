"""One process, whole model: the plain engine, and the behaviour the other engines start from."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import ContextManager

import torch
from torch import nn

from qtrain.checkpoint.train_state import required_files
from qtrain.config.schema import Recipe
from qtrain.distributed import collectives
from qtrain.distributed.engine import Engine, MakeOptimizer, StepOutcome, check_resume_compatible, check_whole, trainable
from qtrain.distributed.env import DistEnv
from qtrain.quant.nf4 import NF4Weight
from qtrain.quant.shard import RowShard


class PlainEngine(Engine):
    """One process, whole model; torch clipping and optimizer step."""

    name = "plain"
    owns_forward = False
    reshards = True  # a whole optimizer state fits any number of processes
    supports_loss_scaling = True
    gathers_parameters = False

    def __init__(self, recipe: Recipe, env: DistEnv) -> None:
        self.recipe, self.env, self.device = recipe, env, env.device()
        self.model: nn.Module | None = None
        self.forward_model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    # -- placing the model ---------------------------------------------------------------
    def row_shard(self) -> RowShard:
        return RowShard()

    def wrap(self, model: nn.Module, make_optimizer: MakeOptimizer) -> torch.optim.Optimizer:
        self.model = self.forward_model = model
        self.optimizer = make_optimizer(trainable(model))
        return self.optimizer

    # -- one optimizer step --------------------------------------------------------------
    def accumulating(self, last: bool) -> ContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, scaler=None) -> None:
        (loss if scaler is None else scaler.scale(loss)).backward()

    def step(self, loss_finite: bool, scaler=None) -> StepOutcome:
        """Unscale (fp16), clip, then apply the update unless the loss or the gradient norm is non-finite."""
        opt = self.optimizer
        if scaler is not None:
            scaler.unscale(opt)  # clip and judge the true gradients, not the scaled ones
        norm = self.clip_grad_norm(self.recipe.train.grad_clip)
        applied = loss_finite and math.isfinite(norm)
        if scaler is not None:
            scaler.step(opt, apply=applied)  # and adapt the scale (it backs off after an overflow)
        elif applied:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return StepOutcome(norm, applied)

    def clip_grad_norm(self, max_norm: float | None) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        limit = max_norm if max_norm is not None else math.inf
        return float(torch.nn.utils.clip_grad_norm_(params, limit))

    # -- collectives ---------------------------------------------------------------------
    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return collectives.all_reduce_sum(values, self.device)

    def any_rank(self, flag: bool) -> bool:
        return collectives.any_rank(flag, self.device)

    def barrier(self) -> None:
        collectives.barrier()

    # -- whole weights -------------------------------------------------------------------
    @contextlib.contextmanager
    def whole_trainable(self, modify: bool = False):
        """Inside, the model's trainable parameters are whole tensors (every rank calls this)."""
        check_whole(self.model)
        yield

    # -- checkpoints ---------------------------------------------------------------------
    def checkpoint_files(self, method: str) -> list[str]:
        """Files a checkpoint this run can resume from must hold."""
        return required_files(self.env.world_size, method)

    def optimizer_record(self):
        """What `optimizer.safetensors` holds: the optimizer itself, or a record of the engine's layout."""
        return self.optimizer

    def save_state(self, tmp: Path) -> None:
        """The engine's sharded state (every rank calls this); nothing for whole optimizers."""

    def load_state(self, ckpt: Path) -> None:
        """After the adapter and `optimizer.safetensors` are loaded: the engine's sharded state."""

    def check_resume(self, saved: dict) -> None:
        """Refuse a checkpoint this run cannot continue exactly (CheckpointError naming the fix)."""
        check_resume_compatible(saved, self.name, self.reshards, self.env.world_size,
                                self.recipe.train.micro_batch_size)

    # -- sizes ---------------------------------------------------------------------------
    def numel(self, p: torch.Tensor) -> int:
        """Values the parameter stands for (all ranks together)."""
        return p.numel()

    def local_bytes(self, p: torch.Tensor) -> int:
        """Bytes of `p` resident on this rank."""
        return p.numel() * p.element_size()

    def nf4_bytes(self, model: nn.Module) -> int:
        """Bytes of the 4-bit base resident on this rank, from tensor storage (padding included)."""
        total = 0
        for m in model.modules():
            if isinstance(m, NF4Weight):
                total += sum(self.local_bytes(p) for p in m.parameters())
                total += sum(b.numel() * b.element_size() for b in m.buffers())
        return total


