"""DoRA: LoRA with a learned magnitude per output row (Liu et al. 2024), over a dense or NF4 base.

    W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row        m starts at ‖W‖_row, so a fresh adapter is the base

Runs through `qtrain_kernels.adapted_linear` (the LoRA dispatch point's sibling): the row norm is
computed from W·Aᵀ and a cached ‖W‖², never from a materialized W + s·B·A. The artifact is peft's
LORA format with `use_dora: true` and a `lora_magnitude_vector` per layer. Merging is exact math
(W' above) and allowed.
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.peft.artifact import PREFIX
from qtrain.peft.lora import LoRA, LoRALinear
from qtrain.peft.multi_linear import LoRAWeights
from qtrain.quant.linear import kernel_kwargs
from qtrain_kernels.adapted_linear import adapted_linear


class DoRALinear(LoRALinear):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__(base, r, alpha, dropout, rslora)
        with torch.no_grad():
            w_sq = self._weight_fn(torch.float32).float().pow(2).sum(1)
        # ‖W_row‖² of the frozen base (W never changes), for the row norm without W + s·B·A.
        self.register_buffer("w_sq", w_sq, persistent=False)
        self.lora_magnitude_vector = nn.Parameter(w_sq.sqrt())

    def function(self) -> tuple:
        return adapted_linear, {"out_scale": self.lora_magnitude_vector, "dora": True, "w_sq": self.w_sq}


class DoRAWeights(LoRAWeights):
    """LoRA's tensors plus the magnitude and the base's cached ‖W_row‖²."""

    kind = "dora"

    def __init__(self, layer: DoRALinear) -> None:
        super().__init__(layer.lora_A.weight, layer.lora_B.weight, layer.scale)
        self.register_buffer("magnitude", layer.lora_magnitude_vector.detach().float().clone())
        self.register_buffer("w_sq", layer.w_sq.detach().clone())

    def single(self, layer, x, bias):
        a, b = self.cast(x.dtype)
        return adapted_linear(x, layer._weight_fn, bias, a, b, self.scale, out_scale=self.magnitude, dora=True,
                              w_sq=self.w_sq, **kernel_kwargs(layer.base_layer))

    def merged(self, w, b):
        v = w + self.delta().to(w.device)
        return self.magnitude.to(w.device)[:, None] * v / v.norm(dim=1, keepdim=True), b


class DoRA(LoRA):
    name = "dora"
    label = "DoRA"
    layer_type = DoRALinear

    def entry(self, layer: DoRALinear) -> DoRAWeights:
        return DoRAWeights(layer)

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = super().state(model)
        for name, mod in self.layers(model).items():
            out[f"{PREFIX}{name}.lora_magnitude_vector"] = mod.lora_magnitude_vector
        return out

    def artifact_config(self, model: nn.Module, cfg, base_model: str) -> dict:
        return {**super().artifact_config(model, cfg, base_model), "use_dora": True}
