"""Several adapters over one base at inference: per-row routing over every holder of a model.

The holders themselves live with the methods (qtrain.peft.holder and the method files): linear-layer
adapters in `MultiAdapterLinear` (qtrain.peft.multi_linear, which documents the mixed-batch
kernels), prompt/prefix adapters in the model's `SequenceAdapters`, parallel bottleneck adapters in
`ParallelAdapters`, layer freezing in `FreezeBlocks`. This module routes a batch across all of them
and turns a model trained with LoRA into one holding that LoRA as a named adapter.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

from torch import nn

from qtrain.peft.holder import check_adapter_name, holders
from qtrain.peft.lora import LoRALinear
from qtrain.peft.multi_linear import (CONCAT_MAX_RANK, LoRAWeights, MultiAdapterLinear, RouteMethod, multi_linears,
                                      wrap_linear)

# The linear holder kept its first name: it held LoRA adapters only.
MultiLoRALinear = MultiAdapterLinear
Method = RouteMethod

__all__ = ["CONCAT_MAX_RANK", "MultiLoRALinear", "check_adapter_name", "convert_lora_model", "multi_lora_modules",
           "use_adapters", "wrap_linear"]


def multi_lora_modules(model: nn.Module) -> dict[str, MultiAdapterLinear]:
    return multi_linears(model)


def convert_lora_model(model: nn.Module, name: str = "default") -> dict[str, MultiAdapterLinear]:
    """Turn every `LoRALinear` of `model` into a `MultiAdapterLinear` holding its weights as adapter `name`.

    Module instances are replaced; the frozen base layers are reused, not copied.
    """
    check_adapter_name(name)
    out = {}
    for path, mod in [(n, m) for n, m in model.named_modules() if type(m) is LoRALinear]:
        wrapped = wrap_linear(model, path)
        wrapped.add(name, LoRAWeights(mod.lora_A.weight, mod.lora_B.weight, mod.scale))
        out[path] = wrapped
    return out


@contextlib.contextmanager
def use_adapters(model: nn.Module, rows: Sequence[Optional[str]], method: RouteMethod = "auto") -> Iterator[None]:
    """Within the block, batch row i of every forward uses adapter `rows[i]` (None: the base alone).

    The route is set on every holder of the model and cleared on exit; nothing global. A holder
    whose kind cannot differ per row refuses (ConfigError) before any forward. `method` picks the
    mixed-batch kernel of linear layers (see qtrain.peft.multi_linear); results agree either way.
    """
    if method not in ("auto", "concat", "gather"):
        raise ValueError(f"method={method!r}: expected auto, concat or gather")
    routed = list(holders(model).values())
    try:
        for holder in routed:
            holder.set_route(list(rows), method)
        yield
    finally:
        for holder in routed:
            holder.set_route(None)
