"""The one injection mechanism for methods that change a linear layer (LoRA, DoRA, (IA)^3, BitFit,
diff pruning): replace each target linear *instance* with an `AdaptedLinear` holding it.

Transformers' classes stay untouched. Every `AdaptedLinear` runs its base through the dispatch
point of `qtrain_kernels.lora_linear` (dense or NF4, torch or fused Triton), so the base weight
is dequantized on demand and never kept; the trainer sets the two recompute flags on all of them.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import nn

from qtrain.models.arch_spec import spec_for_type
from qtrain.peft.recompute import ATTENTION_PROJECTIONS, keep_matmul_outputs, keeps_output
from qtrain.peft.targets import find_targets, resolve_targets
from qtrain.quant.linear import NF4Linear, dense_weight_fn, kernel_kwargs

LINEAR_TYPES = (nn.Linear, NF4Linear)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on for x's device, else x's own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def module_device(module: nn.Module) -> torch.device:
    return next(iter(list(module.parameters()) + list(module.buffers()))).device


class WrapsLinear(nn.Module):
    """A module standing in for a frozen base linear (nn.Linear or NF4Linear) it holds as `base_layer`."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self._weight_fn = dense_weight_fn(base)

    @property
    def weight(self):
        """The frozen base weight when it is dense (None for an NF4 base), for model code that reads
        `layer.weight` of a linear: T5's feed-forward casts its input to `wo.weight.dtype`."""
        return getattr(self.base_layer, "weight", None)


class AdaptedLinear(WrapsLinear):
    """A frozen base linear plus a method's trainable change (a training layer)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        # Set by the trainer when gradient checkpointing is on (see qtrain_kernels.lora_linear).
        self.save_weight_for_backward = False
        # Set by the trainer under selective recompute (qtrain.peft.recompute).
        self.keep_output = False
        self.adapter_enabled = True

    @property
    def base_product_saves_nothing(self) -> bool:
        """Whether nothing this layer saves for backward comes after its base product x·Wᵀ (LoRA's
        torch path: `qtrain_kernels.lora_linear.BaseProduct`), so a recompute that needs nothing
        after the layer stops before that GEMM. Not so for one-Function layers (DoRA, (IA)³, BitFit)."""
        return False

    @property
    def base_bias(self):
        return getattr(self.base_layer, "bias", None)

    def kernel_kwargs(self) -> dict:
        return kernel_kwargs(self.base_layer)

    def dispatch(self, fn: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        """Run `fn` (a dispatch-point function) inside the keep-outputs context when this layer keeps its output."""
        if not self.keep_output:  # the default: no context switch on every call
            return fn(*args, **kwargs)
        with keep_matmul_outputs(True):
            return fn(*args, **kwargs)


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def target_names(model: nn.Module, targets: Union[list[str], str], default: Callable[[], list[str]],
                 linear_types: tuple[type, ...] = LINEAR_TYPES) -> list[str]:
    """Names of the linears `targets` picks, after resolving auto (`default()`) / all-linear."""
    return find_targets(model, resolve_targets(model, targets, default, linear_types), linear_types)


def wrap_targets(model: nn.Module, targets: Union[list[str], str], default: Callable[[], list[str]],
                 make: Callable[[str, nn.Module], nn.Module]) -> list[str]:
    """Replace every linear matching `targets` (after resolving auto / all-linear) by `make(name, linear)`."""
    names = target_names(model, targets, default)
    for name in names:
        model.set_submodule(name, make(name, model.get_submodule(name)))
    return names


def adapted_linears(model: nn.Module) -> dict[str, AdaptedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def resolved_leaves(names: list[str]) -> list[str]:
    """The distinct leaf names of adapted modules: the target list a saved adapter records."""
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def prepare_recompute(model: nn.Module, recompute: str) -> None:
    """With gradient checkpointing on: every adapted layer keeps its recomputed W for its backward,
    and the policy's layers keep their outputs (the attention's projections and the outputs nothing
    needs again from the model's spec)."""
    spec = spec_for_type(getattr(model.config, "model_type", ""))
    attention = spec.attention_leaves() if spec else ATTENTION_PROJECTIONS
    unneeded = spec.unneeded_outputs(model.config) if spec else ()
    for name, mod in adapted_linears(model).items():
        mod.save_weight_for_backward = True
        skip = unneeded if mod.base_product_saves_nothing else ()
        mod.keep_output = keeps_output(recompute, name.rsplit(".", 1)[-1], attention, skip)
