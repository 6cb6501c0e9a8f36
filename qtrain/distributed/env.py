"""The process's place in a launch: the only reader of launcher environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    # Processes on this node (torchrun: LOCAL_WORLD_SIZE, deepspeed: LOCAL_SIZE): they share its CPU cores.
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        """Each rank owns one whole device: `cuda:local_rank`, or the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def read_env() -> DistEnv:
    """Rank/world from torchrun/deepspeed variables; a plain `python` run is rank 0 of 1."""
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1))),
    )
