"""BitFit: train bias terms only (Ben Zaken et al. 2022), as a zero-initialised bias delta per linear.

    y = x·Wᵀ + b + β          β starts at zero: a fresh adapter is the base bit for bit

Training β on top of a frozen b is training b itself (same gradient, same optimizer steps); on
architectures whose linears have no bias (Llama, T5), β is the bias they never had, as peft's
BEFT method does. Which linears: `peft.targets` (auto: every attention and FFN projection). Runs
through `qtrain_kernels.adapted_linear` on the LoRA dispatch point. The artifact is peft's BEFT
format (`beft_bias` of shape [1, out]). Merging adds β into the bias; a model family whose config
cannot give those linears a bias (T5) refuses it with the reason.
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.config.schema import PeftConfig
from qtrain.peft.artifact import PREFIX
from qtrain.peft.layer import AdaptedLinear, compute_dtype, module_device
from qtrain.peft.linear_method import LinearMethod
from qtrain.peft.lora import recorded_targets
from qtrain.peft.method import task_type_of
from qtrain.peft.multi_linear import LinearEntry
from qtrain.quant.linear import kernel_kwargs
from qtrain_kernels.adapted_linear import adapted_linear
from qtrain_kernels.lora_linear import lora_linear


class BitFitLinear(AdaptedLinear):
    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.beft_bias = nn.Parameter(torch.zeros(1, self.out_features, dtype=torch.float32,
                                                  device=module_device(base)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(compute_dtype(x))
        bias, kw = self.base_bias, self.kernel_kwargs()
        if not self.adapter_enabled:
            return lora_linear(x, self._weight_fn, bias, **kw)
        return self.dispatch(adapted_linear, x, self._weight_fn, bias, None, None, 1.0, 0.0,
                             self.save_weight_for_backward, bias_delta=self.beft_bias.view(-1), **kw)


class BitFitWeights(LinearEntry):
    kind = "bitfit"

    def __init__(self, layer: BitFitLinear) -> None:
        super().__init__()
        self.register_buffer("beta", layer.beft_bias.detach().float().reshape(-1).clone())

    def single(self, layer, x, bias):
        return adapted_linear(x, layer._weight_fn, bias, bias_delta=self.beta, **kernel_kwargs(layer.base_layer))

    def merged(self, w, b):
        beta = self.beta.to(w.device)
        return w, beta.clone() if b is None else b + beta


class BitFit(LinearMethod):
    name = "bitfit"
    peft_type = "BEFT"
    layer_type = BitFitLinear

    def make_layer(self, name: str, base: nn.Module, cfg: PeftConfig, context) -> BitFitLinear:
        return BitFitLinear(base)

    def entry(self, layer: BitFitLinear) -> BitFitWeights:
        return BitFitWeights(layer)

    def describe(self, cfg: PeftConfig, names: list[str]) -> str:
        return f"BitFit (bias terms) on {len(names)} layers"

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{PREFIX}{name}.beft_bias": mod.beft_bias for name, mod in self.layers(model).items()}

    def artifact_config(self, model: nn.Module, cfg: PeftConfig, base_model: str) -> dict:
        return {"peft_type": "BEFT", "task_type": task_type_of(model), "base_model_name_or_path": base_model,
                "target_modules": recorded_targets(cfg, list(self.layers(model))), "init_weights": True,
                "inference_mode": True, "modules_to_save": None}

    def config_from_artifact(self, config: dict) -> PeftConfig:
        return PeftConfig(method="bitfit", targets=config["target_modules"])
