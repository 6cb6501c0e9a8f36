"""Which rows of each frozen base tensor this process keeps when an engine shards the base.

The loader reads and keeps only this rank's rows; the engine (FSDP2, ZeRO-3) then hands them
to its sharded containers. Rows follow `torch.chunk` along dim 0 — chunks of ceil(n / world)
rows, rank r taking chunk r, the last ranks possibly shorter or empty — which is FSDP2's own
`Shard(0)` layout, so FSDP2 adopts the loaded rows without copying or gathering them. An NF4
weight's rows are whole quantization blocks (see `NF4Weight.quantize_rows`).

A tensor the loader kept only part of carries the full shape it stands for (`full_shape`), so
an engine can tell a local shard from a whole tensor without a registry beside the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

_FULL_SHAPE = "qtrain_full_shape"


@dataclass(frozen=True)
class RowShard:
    """This process's share of the base: rank `rank` of `world`.

    `all_gather` (same-shape tensors from every rank, in rank order) is the one collective the
    loader needs: double quantization takes the mean of a whole weight's block absmax.
    """

    rank: int = 0
    world: int = 1
    all_gather: Optional[Callable[[torch.Tensor], list[torch.Tensor]]] = None

    @property
    def whole(self) -> bool:
        return self.world == 1

    def rows(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's rows of a dim-0 size `n` (torch.chunk / FSDP2 Shard(0) order)."""
        per = -(-n // self.world)
        return min(n, self.rank * per), min(n, (self.rank + 1) * per)

    def gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        if self.whole:
            return [t]
        if self.all_gather is None:
            raise RuntimeError("RowShard.all_gather is not set: a sharded load needs a process group")
        return self.all_gather(t)


def mark_full_shape(param: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Record on a local shard the shape of the whole tensor it is part of."""
    setattr(param, _FULL_SHAPE, torch.Size(shape))
    return param


def full_shape(param: torch.Tensor) -> Optional[torch.Size]:
    """The whole tensor's shape if `param` holds only this rank's rows, else None."""
    return getattr(param, _FULL_SHAPE, None)
