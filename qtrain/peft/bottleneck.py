"""Bottleneck adapters: small down-project / nonlinearity / up-project layers inside every block.

    sequential (on a sublayer's output h):   h + up(act(down(h)))
    parallel   (beside the FFN, input x):    FFN(x) + up(act(down(x)))

Placements (`peft.placement`): `houlsby` puts a sequential adapter after the attention output
projection(s) and after the FFN output projection (Houlsby et al. 2019); `pfeiffer` only after the
FFN (Pfeiffer et al. 2021); `parallel` one beside the FFN (He et al. 2022). Where those sit comes
from the architecture spec. The width is hidden / `reduction_factor`; `up` starts at zero, so a
fresh adapter is the base bit for bit (Houlsby's near-identity init, made exact). Adapter weights
are fp32 masters, cast to the compute dtype on use.

A sequential adapter trains inside a `BottleneckLinear` (the projection it follows, through the
LoRA dispatch point) and is served as an entry of that projection's MultiAdapterLinear; parallel
adapters live in a `ParallelAdapters` holder registered on the FFN (a forward hook adds their
output; the FFN's own modules keep their names). Compacter (compacter.py) is the same with
parameterized-hypercomplex layers.

Artifact (qtrain's own format, docs/methods.md; peft has no bottleneck adapters): adapter_config.json
with `qtrain_method`, `placement`, `reduction_factor`, `activation`, `bottleneck_size`;
adapter_model.safetensors holds `<module>.adapter_down.weight|bias` and `<module>.adapter_up.weight|bias`
per adapted module (the adapters library's names, without its per-adapter prefix). Adapters add
layers, so merging is refused.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.config.schema import PeftConfig
from qtrain.errors import CheckpointError
from qtrain.models.arch_spec import ArchSpec, arch_spec, block_lists, in_block
from qtrain.peft import artifact
from qtrain.peft.holder import AdapterHolder
from qtrain.peft.layer import AdaptedLinear, compute_dtype, freeze, module_device
from qtrain.peft.method import Method, task_type_of
from qtrain.peft.multi_linear import LinearEntry, wrap_linear
from qtrain.quant.linear import kernel_kwargs
from qtrain_kernels.lora_linear import lora_linear

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
TRAINED = "default"
PARALLEL = "parallel_adapters"


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight.to(x.dtype), bias.to(x.dtype))


class Bottleneck(nn.Module):
    def __init__(self, dim: int, width: int, activation: str, device: torch.device) -> None:
        super().__init__()
        self.activation = activation
        self.adapter_down = nn.Linear(dim, width, dtype=torch.float32, device=device)
        self.adapter_up = nn.Linear(width, dim, dtype=torch.float32, device=device)
        nn.init.normal_(self.adapter_down.weight, std=dim ** -0.5)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(compute_dtype(x))
        z = ACTIVATIONS[self.activation](_linear(x, self.adapter_down.weight, self.adapter_down.bias))
        return _linear(z, self.adapter_up.weight, self.adapter_up.bias)


class BottleneckLinear(AdaptedLinear):
    """An output projection (attention or FFN) with a sequential adapter on its output: h + adapter(h)."""

    def __init__(self, base: nn.Module, adapter: nn.Module) -> None:
        super().__init__(base)
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(compute_dtype(x))
        h = self.dispatch(lora_linear, x, self._weight_fn, self.base_bias, None, None, 1.0, 0.0,
                          self.save_weight_for_backward, **self.kernel_kwargs())
        return h + self.adapter(h).to(h.dtype) if self.adapter_enabled else h


class SequentialWeights(LinearEntry):
    """A sequential adapter as an inference entry of the projection it follows."""

    kind = "bottleneck"

    def __init__(self, adapter: nn.Module) -> None:
        super().__init__()
        self.adapter = adapter.requires_grad_(False)

    def single(self, layer, x, bias):
        h = lora_linear(x, layer._weight_fn, bias, **kernel_kwargs(layer.base_layer))
        return h + self.adapter(h).to(h.dtype)


class ParallelAdapters(nn.Module, AdapterHolder):
    """Named adapters beside an FFN: registered as its child `parallel_adapters`, they add
    adapter(input) to its output through a forward hook (the FFN's own submodules keep their names)."""

    kind = "parallel bottleneck"

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active: Optional[str] = None
        self.enabled = True

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        name = self.current()
        if name is None or name not in self.adapters:
            return output
        return output + self.adapters[name](args[0]).to(output.dtype)


def parallel_holder(model: nn.Module, site: str) -> ParallelAdapters:
    """The FFN at `site`'s holder, created (and hooked) on first use."""
    ffn = model.get_submodule(site)
    holder = getattr(ffn, PARALLEL, None)
    if not isinstance(holder, ParallelAdapters):
        holder = ParallelAdapters()
        ffn.add_module(PARALLEL, holder)
        ffn.register_forward_hook(holder.hook)
    return holder


def adapter_sites(model: nn.Module, spec: ArchSpec, placement: str) -> list[str]:
    """Module paths that get an adapter: output projections (sequential) or FFNs (parallel), block by block."""
    sites = []
    for path, blocks in block_lists(model, spec):
        for i, block in enumerate(blocks):
            if placement == "parallel":
                rel = in_block(block, spec.mlp)
            else:
                rel = (in_block(block, spec.attention_output) if placement == "houlsby" else []) + \
                    in_block(block, spec.mlp_output)
            sites += [f"{path}.{i}.{r}" for r in rel]
    return sites


def hidden_size(model: nn.Module) -> int:
    c = model.config
    return int(getattr(c, "hidden_size", None) or getattr(c, "d_model"))


class BottleneckAdapters(Method):
    name = "bottleneck"
    merge_refusal = ("bottleneck adapters add layers (down-project, nonlinearity, up-project) that no weight of the "
                     "base can absorb; serve the adapter with qtrain generate instead")

    def make_adapter(self, model: nn.Module, cfg: PeftConfig, adapter_name: str, device: torch.device) -> nn.Module:
        return Bottleneck(hidden_size(model), self.width(model, cfg), cfg.activation, device)

    def width(self, model: nn.Module, cfg: PeftConfig) -> int:
        return max(1, hidden_size(model) // cfg.reduction_factor)

    def sites(self, model: nn.Module, cfg: PeftConfig) -> list[str]:
        return adapter_sites(model, arch_spec(model, f"{self.name} adapters"), cfg.placement)

    def inject(self, model: nn.Module, cfg: PeftConfig, tokenizer=None) -> list[str]:
        freeze(model)
        self.check(model, cfg)
        sites = self.sites(model, cfg)
        for site in sites:
            device = module_device(model.get_submodule(site))
            adapter = self.make_adapter(model, cfg, TRAINED, device)
            if cfg.placement == "parallel":
                holder = parallel_holder(model, site)
                holder.adapters[TRAINED], holder.active = adapter, TRAINED
            else:
                model.set_submodule(site, BottleneckLinear(model.get_submodule(site), adapter))
        return sites

    def check(self, model: nn.Module, cfg: PeftConfig) -> None:
        """Refuse settings the model cannot take (compacter: widths n does not divide)."""

    def adapters(self, model: nn.Module, name: str = TRAINED) -> dict[str, nn.Module]:
        """Site -> the adapter module `name` there (training layers' own, or a holder's)."""
        out = {}
        for site, mod in model.named_modules():
            if isinstance(mod, BottleneckLinear):
                out[site] = mod.adapter
            elif isinstance(mod, ParallelAdapters) and name in mod.adapters:
                out[site.rsplit(".", 1)[0]] = mod.adapters[name]
        return out

    def describe(self, cfg: PeftConfig, names: list[str]) -> str:
        return f"{self.name} adapters ({cfg.placement}, reduction factor {cfg.reduction_factor}) at {len(names)} sites"

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{site}.{key}": p for site, adapter in self.adapters(model).items()
                for key, p in adapter.named_parameters()}

    def artifact_config(self, model: nn.Module, cfg: PeftConfig, base_model: str) -> dict:
        return {"qtrain_method": self.name, "task_type": task_type_of(model), "base_model_name_or_path": base_model,
                "placement": cfg.placement, "reduction_factor": cfg.reduction_factor, "activation": cfg.activation,
                "bottleneck_size": self.width(model, cfg), "hidden_size": hidden_size(model)}

    def config_from_artifact(self, config: dict) -> PeftConfig:
        return PeftConfig(method=self.name, placement=config["placement"],
                          reduction_factor=int(config["reduction_factor"]), activation=config["activation"])

    def attach(self, model: nn.Module, name: str, cfg: PeftConfig, tensors: dict[str, torch.Tensor],
               source: str) -> None:
        """Build adapter `name` at every site, check the saved tensors against it (strict), then place it:
        sequential ones as entries of the projections' MultiAdapterLinear, parallel ones in the FFNs' holders."""
        self.check(model, cfg)
        sites = self.sites(model, cfg)
        built = {site: self.make_adapter(model, cfg, name, module_device(model.get_submodule(site)))
                 for site in sites}
        params = {f"{site}.{key}": p for site, a in built.items() for key, p in a.named_parameters()}
        params.update(self.shared_state(model, name))
        try:
            artifact.load_named(params, tensors, what=f"{self.name} adapter site")
        except CheckpointError as exc:
            raise CheckpointError(f"{source}: {exc}") from None
        for site, adapter in built.items():
            adapter.requires_grad_(False)
            if cfg.placement == "parallel":
                parallel_holder(model, site).adapters[name] = adapter
            else:
                wrap_linear(model, site).add(name, SequentialWeights(adapter))

    def shared_state(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """Parameters shared by every site of adapter `name` (compacter's rules), by artifact key."""
        return {}
