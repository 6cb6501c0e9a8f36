"""Attach adapters by replacing target module *instances*; transformers' classes stay untouched."""

from __future__ import annotations

from torch import nn

from qtrain.config.schema import PeftConfig
from qtrain.peft.lora import LoRALinear
from qtrain.peft.targets import find_targets
from qtrain.quant.linear import NF4Linear

LINEAR_TYPES = (nn.Linear, NF4Linear)


def inject_lora(model: nn.Module, cfg: PeftConfig) -> list[str]:
    """Freeze every parameter, then wrap each target linear in a `LoRALinear`; returns their names."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = find_targets(model, cfg.targets, LINEAR_TYPES)
    for name in names:
        base = model.get_submodule(name)
        model.set_submodule(name, LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
