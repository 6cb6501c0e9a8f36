"""DDP: every rank holds the whole (4-bit) base on its own device; gradients are all-reduced.

Each rank loads its own quantized base on `cuda:local_rank` (never `device_map="auto"`); only the
LoRA parameters have gradients, so DDP all-reduces adapter gradients only (a few MB per step
even for 8B models). With one process it is the plain engine.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch import nn

from qtrain.distributed import collectives
from qtrain.distributed.engine import MakeOptimizer, trainable
from qtrain.distributed.plain import PlainEngine


class DDPEngine(PlainEngine):
    name = "ddp"

    def wrap(self, model: nn.Module, make_optimizer: MakeOptimizer) -> torch.optim.Optimizer:
        self.model = self.forward_model = model
        self.optimizer = make_optimizer(trainable(model))
        if collectives.active():
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = DDP(model, device_ids=ids, find_unused_parameters=False)
            self.owns_forward = True
        return self.optimizer

    def accumulating(self, last: bool) -> ContextManager:
        """DDP's `no_sync` before the last micro-batch (one all-reduce per optimizer step)."""
        if last or self.forward_model is self.model:
            return contextlib.nullcontext()
        return self.forward_model.no_sync()
