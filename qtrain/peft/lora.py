"""LoRA: a frozen base linear (dense or NF4) plus a trainable low-rank update.

    y = base(x) + s · (dropout(x) · Aᵀ) · Bᵀ,   s = alpha / r   (rsLoRA: alpha / sqrt(r))

A starts as nn.Linear's default (Kaiming-uniform) and B at zero, so a fresh adapter leaves the
model exactly at its base. Submodules are named `lora_A` / `lora_B` so state-dict keys are
PEFT's. A and B are kept in fp32 and cast to the compute dtype on use. The artifact is peft's
LORA format; DoRA (dora.py) is this layer with a magnitude vector.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qtrain.config.schema import PeftConfig
from qtrain.peft.artifact import PREFIX
from qtrain.peft.layer import AdaptedLinear, compute_dtype, module_device, resolved_leaves
from qtrain.peft.linear_method import LinearMethod
from qtrain.peft.method import task_type_of
from qtrain.peft.multi_linear import LoRAWeights
from qtrain_kernels.lora_linear import lora_linear


def lora_scale(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRALinear(AdaptedLinear):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__(base)
        self.r, self.alpha, self.dropout, self.rslora = r, alpha, dropout, rslora
        self.scale = lora_scale(r, alpha, rslora)
        device = module_device(base)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, dtype=torch.float32, device=device)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, dtype=torch.float32, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(compute_dtype(x))
        bias, kw = self.base_bias, self.kernel_kwargs()
        if not self.adapter_enabled:
            return lora_linear(x, self._weight_fn, bias, **kw)
        p = self.dropout if self.training else 0.0
        fn, extra = self.function()
        return self.dispatch(fn, x, self._weight_fn, bias, self.lora_A.weight, self.lora_B.weight,
                             self.scale, p, self.save_weight_for_backward, **extra, **kw)

    def function(self) -> tuple:
        """The dispatch-point function this layer runs and its extra keyword arguments (DoRA: its sibling)."""
        return lora_linear, {}

    @property
    def base_product_saves_nothing(self) -> bool:
        return self.function()[0] is lora_linear

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, dropout={self.dropout}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def recorded_targets(cfg: PeftConfig, names: list[str]):
    """What adapter_config.json lists: the recipe's targets, or for auto / all-linear what they resolved to."""
    return resolved_leaves(names) if cfg.targets in ("auto", "all-linear") else cfg.targets


def lora_config(cfg: PeftConfig, base_model: str, task_type: str, targets) -> dict:
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": targets,
        "use_rslora": cfg.rslora, "use_dora": False, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None,
    }


class LoRA(LinearMethod):
    name = "lora"
    peft_type = "LORA"
    label = "LoRA"
    layer_type: type = LoRALinear

    def make_layer(self, name: str, base: nn.Module, cfg: PeftConfig, context) -> LoRALinear:
        return self.layer_type(base, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora)

    def entry(self, layer: LoRALinear) -> LoRAWeights:
        return LoRAWeights(layer.lora_A.weight, layer.lora_B.weight, layer.scale)

    def describe(self, cfg: PeftConfig, names: list[str]) -> str:
        return f"{self.label} r={cfg.r} on {len(names)} layers"

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        for name, mod in self.layers(model).items():
            out[f"{PREFIX}{name}.lora_A.weight"] = mod.lora_A.weight
            out[f"{PREFIX}{name}.lora_B.weight"] = mod.lora_B.weight
        return out

    def artifact_config(self, model: nn.Module, cfg: PeftConfig, base_model: str) -> dict:
        targets = recorded_targets(cfg, list(self.layers(model)))
        return lora_config(cfg, base_model, task_type_of(model), targets)

    def config_from_artifact(self, config: dict) -> PeftConfig:
        return PeftConfig(method=self.name, r=int(config["r"]), alpha=float(config["lora_alpha"]),
                          dropout=float(config.get("lora_dropout", 0.0)), targets=config["target_modules"],
                          rslora=bool(config.get("use_rslora", False)))


def inject_lora(model: nn.Module, cfg: PeftConfig) -> list[str]:
    """Freeze every parameter, then wrap each target linear in a `LoRALinear`; returns their names."""
    return LoRA().inject(model, cfg)
