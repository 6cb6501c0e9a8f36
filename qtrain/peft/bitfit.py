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
from qtrain.peft.layer import AdaptedLinear, compute_dtype, freeze, module_device, wrap_targets
from qtrain.peft.lora import default_targets, recorded_targets
from qtrain.peft.method import Method, task_type_of
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


def bitfit_modules(model: nn.Module) -> dict[str, BitFitLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BitFitLinear)}


class BitFit(Method):
    name = "bitfit"
    peft_type = "BEFT"

    def inject(self, model: nn.Module, cfg: PeftConfig, tokenizer=None) -> list[str]:
        freeze(model)
        return wrap_targets(model, cfg.targets, default_targets(model), lambda _, base: BitFitLinear(base))

    def describe(self, cfg: PeftConfig, names: list[str]) -> str:
        return f"BitFit (bias terms) on {len(names)} layers"

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{PREFIX}{name}.beft_bias": mod.beft_bias for name, mod in bitfit_modules(model).items()}

    def artifact_config(self, model: nn.Module, cfg: PeftConfig, base_model: str) -> dict:
        return {"peft_type": "BEFT", "task_type": task_type_of(model), "base_model_name_or_path": base_model,
                "target_modules": recorded_targets(cfg, list(bitfit_modules(model))), "init_weights": True,
                "inference_mode": True, "modules_to_save": None}

    def config_from_artifact(self, config: dict) -> PeftConfig:
        return PeftConfig(method="bitfit", targets=config["target_modules"])
