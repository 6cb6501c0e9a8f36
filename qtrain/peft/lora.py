"""`LoRALinear`: a frozen base linear (dense or NF4) plus a trainable low-rank update.

    y = base(x) + s · (dropout(x) · Aᵀ) · Bᵀ,   s = alpha / r   (rsLoRA: alpha / sqrt(r))

A starts as nn.Linear's default (Kaiming-uniform) and B at zero, so a fresh adapter leaves the
model exactly at its base. Submodules are named `lora_A` / `lora_B` so state-dict keys are
PEFT's. A and B are kept in fp32 and cast to the compute dtype on use.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qtrain.quant.linear import dense_weight_fn, kernel_kwargs
from qtrain.peft.recompute import keep_matmul_outputs
from qtrain_kernels.lora_linear import lora_linear


def lora_scale(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on for x's device, else x's own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.dropout, self.rslora = r, alpha, dropout, rslora
        self.scale = lora_scale(r, alpha, rslora)
        device = next(iter(list(base.parameters()) + list(base.buffers()))).device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, dtype=torch.float32, device=device)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, dtype=torch.float32, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        # Set by the trainer when gradient checkpointing is on (see qtrain_kernels.lora_linear).
        self.save_weight_for_backward = False
        # Set by the trainer under selective recompute (train.recompute; qtrain/peft/recompute.py).
        self.keep_output = False
        self.adapter_enabled = True
        self._weight_fn = dense_weight_fn(base)

    @property
    def weight(self):
        """The frozen base weight when it is dense (None for an NF4 base), for model code that reads
        `layer.weight` of a linear: T5's feed-forward casts its input to `wo.weight.dtype`."""
        return getattr(self.base_layer, "weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        x = x.to(dtype)
        bias = getattr(self.base_layer, "bias", None)
        kw = kernel_kwargs(self.base_layer)
        if not self.adapter_enabled:
            return lora_linear(x, self._weight_fn, bias, **kw)
        p = self.dropout if self.training else 0.0
        args = (x, self._weight_fn, bias, self.lora_A.weight, self.lora_B.weight, self.scale, p,
                self.save_weight_for_backward)
        if not self.keep_output:  # the default: no context switch on every call
            return lora_linear(*args, **kw)
        with keep_matmul_outputs(True):
            return lora_linear(*args, **kw)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, dropout={self.dropout}"
