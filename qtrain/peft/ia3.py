"""(IA)³: learned vectors that rescale keys, values and the FFN's inner activations (Liu et al. 2022).

    keys / values:   y = l ⊙ (x·Wᵀ + b)         FFN output projection: y = (x ⊙ l)·Wᵀ + b

l starts at ones, so a fresh adapter is the base bit for bit. Which layers: `peft.targets` (auto:
the architecture's key/value projections and FFN output projection) and, among them,
`peft.feedforward_targets` scale their input (auto: the FFN output projection). Runs through
`qtrain_kernels.adapted_linear` on the LoRA dispatch point. The artifact is peft's IA3 format
(`ia3_l` of shape [out, 1], or [1, in] for a feed-forward layer). Merging scales W's rows or
columns (exact) and is allowed; rows of a batch may each use their own (IA)³ adapter.
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.config.schema import PeftConfig
from qtrain.models.arch_spec import arch_spec, present_leaves
from qtrain.peft.artifact import PREFIX
from qtrain.peft.layer import LINEAR_TYPES, AdaptedLinear, compute_dtype, module_device, resolved_leaves
from qtrain.peft.linear_method import LinearMethod
from qtrain.peft.method import task_type_of
from qtrain.peft.multi_linear import LinearEntry
from qtrain.quant.linear import kernel_kwargs
from qtrain.peft.targets import matches
from qtrain_kernels.adapted_linear import adapted_linear
from qtrain_kernels.lora_linear import lora_linear


class IA3Linear(AdaptedLinear):
    def __init__(self, base: nn.Module, feedforward: bool) -> None:
        super().__init__(base)
        self.feedforward = feedforward
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=torch.float32, device=module_device(base)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(compute_dtype(x))
        bias, kw = self.base_bias, self.kernel_kwargs()
        if not self.adapter_enabled:
            return lora_linear(x, self._weight_fn, bias, **kw)
        vec = self.ia3_l.view(-1)
        kw.update(in_scale=vec) if self.feedforward else kw.update(out_scale=vec)
        return self.dispatch(adapted_linear, x, self._weight_fn, bias, None, None, 1.0, 0.0,
                             self.save_weight_for_backward, **kw)

    def extra_repr(self) -> str:
        return f"scales={'input' if self.feedforward else 'output'}"


class IA3Weights(LinearEntry):
    kind = "ia3"

    def __init__(self, layer: IA3Linear) -> None:
        super().__init__()
        self.feedforward = layer.feedforward
        self.register_buffer("vec", layer.ia3_l.detach().float().reshape(-1).clone())

    def single(self, layer, x, bias):
        kw = {"in_scale" if self.feedforward else "out_scale": self.vec}
        return adapted_linear(x, layer._weight_fn, bias, **kw, **kernel_kwargs(layer.base_layer))

    def merged(self, w, b):
        vec = self.vec.to(w.device)
        if self.feedforward:
            return w * vec[None, :], b
        return w * vec[:, None], None if b is None else b * vec


def _auto(model: nn.Module, paths) -> list[str]:
    return [p.rsplit(".", 1)[-1] for p in paths(arch_spec(model, "(IA)³ targets: auto"))]


def feedforward_targets(model: nn.Module, cfg: PeftConfig):
    """The resolved feed-forward target list (auto: the architecture's FFN output projections)."""
    if cfg.feedforward_targets == "auto":
        return present_leaves(model, _auto(model, lambda s: s.mlp_output), LINEAR_TYPES)
    return cfg.feedforward_targets


class IA3(LinearMethod):
    name = "ia3"
    peft_type = "IA3"
    layer_type = IA3Linear

    def default_targets(self, model: nn.Module):
        return lambda: list(dict.fromkeys(_auto(model, lambda s: s.key_value + s.mlp_output)))

    def context(self, model: nn.Module, cfg: PeftConfig):
        return feedforward_targets(model, cfg)

    def make_layer(self, name: str, base: nn.Module, cfg: PeftConfig, context) -> IA3Linear:
        return IA3Linear(base, matches(name, context))

    def entry(self, layer: IA3Linear) -> IA3Weights:
        return IA3Weights(layer)

    def describe(self, cfg: PeftConfig, names: list[str]) -> str:
        return f"(IA)³ on {len(names)} layers"

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{PREFIX}{name}.ia3_l": mod.ia3_l for name, mod in self.layers(model).items()}

    def artifact_config(self, model: nn.Module, cfg: PeftConfig, base_model: str) -> dict:
        mods = self.layers(model)
        keyword = cfg.targets in ("auto", "all-linear")
        ff = [n for n, m in mods.items() if m.feedforward]
        return {"peft_type": "IA3", "task_type": task_type_of(model), "base_model_name_or_path": base_model,
                "target_modules": resolved_leaves(list(mods)) if keyword else cfg.targets,
                "feedforward_modules": resolved_leaves(ff) if keyword or cfg.feedforward_targets == "auto"
                else cfg.feedforward_targets,
                "fan_in_fan_out": False, "init_ia3_weights": True, "inference_mode": True, "modules_to_save": None}

    def config_from_artifact(self, config: dict) -> PeftConfig:
        return PeftConfig(method="ia3", targets=config["target_modules"],
                          feedforward_targets=config.get("feedforward_modules") or [])
