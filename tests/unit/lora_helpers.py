"""Shared by the unit tests: make an adapter do something (B = 0 at init makes it a no-op)."""

from __future__ import annotations

import torch
from torch import nn

from qtrain.peft.inject import lora_modules


def randomize_lora_b(model: nn.Module, seed: int, std: float) -> None:
    """Fill every LoRA B of `model` from one generator seeded with `seed`, in module order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in lora_modules(model).values():
            mod.lora_B.weight.normal_(std=std, generator=g)
