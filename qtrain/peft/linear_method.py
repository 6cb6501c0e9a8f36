"""What the linear-layer methods share: injecting their training layer at the targets, and attaching a
saved adapter to an inference model as entries of `MultiAdapterLinear`s.

A method says how to build its training layer over a base linear (`make_layer`), which layers are
its own (`layer_type`), and how a trained layer becomes an inference entry (`entry`); targets,
the strict checks of a saved adapter (every key, every shape, nothing extra) and the wrapping are
here, once.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from qtrain.config.schema import PeftConfig
from qtrain.errors import CheckpointError
from qtrain.models.arch_spec import arch_spec
from qtrain.peft.layer import LINEAR_TYPES, AdaptedLinear, freeze, target_names, wrap_targets
from qtrain.peft.method import Method
from qtrain.peft.multi_linear import LinearEntry, base_linears, wrap_linear
from qtrain.peft.targets import matches, resolve_targets


def frozen_base(mod: nn.Module) -> nn.Module:
    """The frozen linear under a holder or training layer (or the linear itself)."""
    return getattr(mod, "base_layer", mod)


def nest(root: nn.Module, name: str, module: nn.Module) -> None:
    """Place `module` at dotted `name` under `root`, creating empty parents as needed."""
    *parents, leaf = name.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    node.add_module(leaf, module)


class LinearMethod(Method):
    layer_type: type = AdaptedLinear

    def default_targets(self, model: nn.Module) -> Callable[[], list[str]]:
        """`peft.targets: auto`: every attention and FFN projection of the model's architecture."""
        return lambda: arch_spec(model, "peft.targets: auto").default_targets()

    def target_names(self, model: nn.Module, targets: Union[list[str], str],
                     linear_types: tuple[type, ...] = LINEAR_TYPES) -> list[str]:
        """The linears of `model` that `targets` adapts (what inject wraps; the planner reads it off a skeleton)."""
        return target_names(model, targets, self.default_targets(model), linear_types)

    def context(self, model: nn.Module, cfg: PeftConfig) -> Any:
        """Whatever make_layer needs that depends on the whole model (resolved once per inject/attach)."""
        return None

    def make_layer(self, name: str, base: nn.Module, cfg: PeftConfig, context: Any) -> AdaptedLinear:
        raise NotImplementedError

    def entry(self, layer: AdaptedLinear) -> LinearEntry:
        raise NotImplementedError

    def layers(self, model: nn.Module) -> dict[str, AdaptedLinear]:
        return {n: m for n, m in model.named_modules() if type(m) is self.layer_type}

    def inject(self, model: nn.Module, cfg: PeftConfig, tokenizer=None) -> list[str]:
        freeze(model)
        context = self.context(model, cfg)
        return wrap_targets(model, cfg.targets, self.default_targets(model),
                            lambda name, base: self.make_layer(name, base, cfg, context))

    def attach(self, model: nn.Module, name: str, cfg: PeftConfig, tensors: dict[str, torch.Tensor],
               source: str) -> None:
        """Check the adapter against `model` on a shadow tree of training layers named like the model's
        layers (so an error names the first bad key as `qtrain train` would), then add its entries."""
        layers = base_linears(model)
        targets = resolve_targets(model, cfg.targets, self.default_targets(model), LINEAR_TYPES)
        names = [n for n in layers if matches(n, targets)]
        if not names:
            raise CheckpointError(f"{source}: target_modules {cfg.targets!r} match no linear layer of this base "
                                  "model: the adapter was trained for a different architecture")
        context = self.context(model, cfg)
        shadow = nn.Module()
        with torch.random.fork_rng(devices=[]):  # layer inits draw randoms; the caller's stream stays untouched
            for n in names:
                nest(shadow, n, self.make_layer(n, frozen_base(layers[n]), cfg, context))
        try:
            self.load_state(shadow, tensors)
        except CheckpointError as exc:
            raise CheckpointError(f"{source}: {exc}") from None
        for n in names:
            wrap_linear(model, n).add(name, self.entry(shadow.get_submodule(n)))

    def merge_check(self, model: nn.Module, name: str) -> Optional[str]:
        """Why adapter `name` cannot be written into a plain model dir of this family (None: it can)."""
        return None
