"""torch.distributed process group, DDP wrapping, and the few collectives the trainer needs.

Every rank holds its own quantized base on its own device (`{"": local_rank}`-style placement,
never `device_map="auto"`); only the LoRA parameters have gradients, so DDP all-reduces adapter
gradients only (a few MB per step even for 8B models).
"""

from __future__ import annotations

import contextlib
import datetime
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from qtrain.distributed.env import DistEnv


def init_process_group(env: DistEnv, timeout_s: float) -> None:
    """nccl on CUDA, gloo on CPU; a collective that waits longer than `timeout_s` fails the job."""
    if env.world_size <= 1 or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the trainable (LoRA) parameters; frozen 4-bit weights are not synchronized."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=False)


def no_sync(model: nn.Module, skip: bool):
    """DDP's `no_sync` while accumulating (all-reduce only on the last micro-batch)."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum scalars over ranks (float64, so token counts and loss sums stay exact)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any rank (preemption, non-finite values)."""
    if not active():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def process_group(env: DistEnv, timeout_s: float) -> Iterator[None]:
    init_process_group(env, timeout_s)
    try:
        yield
    finally:
        destroy()
