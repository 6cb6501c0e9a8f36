"""`NF4Linear`: a frozen linear layer whose weight is stored as NF4 and dequantized on use."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from qtrain.quant.nf4 import NF4Spec, NF4Weight
from qtrain_kernels.dispatch import NF4Buffers
from qtrain_kernels.lora_linear import lora_linear


class NF4Linear(nn.Module):
    """Drop-in for a frozen `nn.Linear`: same in/out features, 4-bit weight, frozen bias."""

    def __init__(self, nf4: NF4Weight, bias: Optional[torch.Tensor], backend: str) -> None:
        super().__init__()
        self.out_features, self.in_features = nf4.shape
        self.nf4 = nf4
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.backend = backend

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], spec: NF4Spec, backend: str) -> NF4Linear:
        return cls(NF4Weight.quantize(weight, spec), bias, backend)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.nf4.dequantize(self.backend)
        return w if w.dtype == dtype else w.to(dtype)

    def nf4_buffers(self) -> Optional[NF4Buffers]:
        """The packed buffers, for the fused kernels (only the triton backend reads them)."""
        return self.nf4.kernel_buffers() if self.backend == "triton" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_linear(x, self.dense_weight, self.bias, **kernel_kwargs(self))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def kernel_kwargs(base: nn.Module) -> dict:
    """What `lora_linear` needs to pick a fused kernel for this base layer (nothing for dense bases)."""
    if isinstance(base, NF4Linear):
        return {"nf4": base.nf4_buffers(), "backend": base.backend}
    return {}


def dense_weight_fn(base: nn.Module):
    """dtype → dense weight of a frozen base layer (NF4Linear or plain nn.Linear)."""
    if isinstance(base, NF4Linear):
        return base.dense_weight

    def dense(dtype: torch.dtype) -> torch.Tensor:
        # Looked up on every call: an engine that shards the base (FSDP2) swaps the parameter object.
        weight = base.weight
        return weight if weight.dtype == dtype else weight.to(dtype)

    return dense
