"""Hot-swap several named LoRA adapters over one loaded base.

    adapters = AdapterSet(model)                 # a base model, or one with LoRALinear layers
    adapters.add_adapter("sql", "runs/sql/adapter")
    adapters.add_adapter("chat", "runs/chat/adapter")
    adapters.set_adapter("sql")                  # every row uses sql
    with adapters.use_adapters(["sql", "chat", None]):   # one forward, one adapter per row
        model(input_ids=ids)
    with adapters.disable_adapters():            # the base alone
        model(input_ids=ids)
    adapters.merge(); ...; adapters.unmerge()    # dense (bf16/fp32) bases only

Merge guarantee: `merge()` keeps a copy of every base weight it changes and `unmerge()` copies it
back, so unmerging restores the base bit for bit (subtracting B·A again would not: floating-point
addition does not undo exactly). The price is one extra copy of the adapted weights while merged.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from qtrain.peft.artifact import read_adapter
from qtrain.config.schema import PeftConfig
from qtrain.errors import CheckpointError, ConfigError
from qtrain.infer.multi_lora import (Method, MultiLoRALinear, check_adapter_name, convert_lora_model,
                                     multi_lora_modules, use_adapters, wrap_linear)
from qtrain.peft.inject import LINEAR_TYPES
from qtrain.peft.lora import LoRA, LoRALinear
from qtrain.peft.registry import method_of_artifact
from qtrain.peft.targets import matches
from qtrain.quant.linear import NF4Linear

DEFAULT_NAME = "default"


def base_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Adaptable layers by name: wrapped ones (Multi/LoRALinear) and bare linears not inside a wrapper."""
    out: dict[str, nn.Module] = {}
    wrappers: set[str] = set()
    for name, mod in model.named_modules():
        if name.rpartition(".")[0] in wrappers:
            continue  # a wrapper's own base_layer / lora_A / lora_B
        if isinstance(mod, (MultiLoRALinear, LoRALinear)):
            wrappers.add(name)
            out[name] = mod
        elif isinstance(mod, LINEAR_TYPES):
            out[name] = mod
    return out


def _frozen_base(mod: nn.Module) -> nn.Module:
    return mod.base_layer if isinstance(mod, (MultiLoRALinear, LoRALinear)) else mod


def _nest(root: nn.Module, name: str, module: nn.Module) -> None:
    """Place `module` at dotted `name` under `root`, creating empty parents as needed."""
    *parents, leaf = name.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    node.add_module(leaf, module)


def stage_adapter(model: nn.Module, cfg: PeftConfig, tensors: dict[str, torch.Tensor],
                  source: str) -> dict[str, LoRALinear]:
    """Check an adapter against `model` and return its weights in `LoRALinear`s over the model's bases.

    The checks are `load_adapter_weights`' own (every key present, every shape right, nothing
    extra, finite), run on a shadow tree of `LoRALinear`s named like the model's layers, so the
    error names the first mismatching key exactly as `qtrain train` would.
    """
    layers = base_linears(model)
    names = [n for n in layers if matches(n, cfg.targets)]
    if not names:
        raise CheckpointError(f"{source}: target_modules {cfg.targets!r} match no linear layer of this base "
                              "model: the adapter was trained for a different architecture")
    shadow = nn.Module()
    # LoRALinear initialises A at random; keep the caller's RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        for n in names:
            _nest(shadow, n, LoRALinear(_frozen_base(layers[n]), cfg.r, cfg.alpha, 0.0, cfg.rslora))
    try:
        LoRA().load_state(shadow, tensors)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    return {n: shadow.get_submodule(n) for n in names}


class AdapterSet:
    """Named adapters over one frozen base; see the module docstring for the API and merge guarantee."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.configs: dict[str, PeftConfig] = {}
        self.sources: dict[str, str] = {}
        first = next((m for m in model.modules() if isinstance(m, LoRALinear)), None)
        if first is not None:  # a model with LoRA injected: its weights become adapter "default"
            layers = convert_lora_model(model, DEFAULT_NAME)
            self.configs[DEFAULT_NAME] = PeftConfig(r=first.r, alpha=first.alpha, rslora=first.rslora,
                                                    targets=sorted({n.rsplit(".", 1)[-1] for n in layers}))
            self.sources[DEFAULT_NAME] = "(LoRA layers of the model)"
        self._active: Optional[str] = None
        self._saved: dict[str, torch.Tensor] = {}
        if DEFAULT_NAME in self.configs:
            self.set_adapter(DEFAULT_NAME)

    # ---- adding ---------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self.configs)

    @property
    def active(self) -> Optional[str]:
        return self._active

    def add_adapter(self, name: str, adapter_dir: str | Path) -> dict:
        """Load a PEFT-format LoRA adapter dir as `name`; returns its adapter_config.json. Read-only."""
        check_adapter_name(name)
        if name in self.configs:
            raise ConfigError(f"adapter name {name!r} is already loaded (from {self.sources[name]}); pick another name")
        path = Path(adapter_dir)
        if not path.is_dir():
            raise CheckpointError(f"adapter dir not found: {path} (pass the adapter/ dir a training run wrote)")
        config, tensors = read_adapter(path)
        method = method_of_artifact(config, str(path / "adapter_config.json"))
        if method.name != "lora":
            raise CheckpointError(f"{path}: a {method.name} adapter; only LoRA adapters load here")
        try:
            cfg = method.config_from_artifact(config)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path / 'adapter_config.json'}: cannot read LoRA settings ({exc!r}); "
                                  "it needs r, lora_alpha and target_modules") from None
        staged = stage_adapter(self.model, cfg, tensors, str(path))
        for layer_name, lora in staged.items():
            wrap_linear(self.model, layer_name).add(name, lora.lora_A.weight, lora.lora_B.weight, lora.scale)
        self.configs[name] = cfg
        self.sources[name] = str(path)
        return config

    def remove_adapter(self, name: str) -> None:
        self._known(name)
        if self._active == name:
            self.set_adapter(None)
        for layer in self._layers().values():
            layer.remove(name)
        del self.configs[name], self.sources[name]

    # ---- choosing -------------------------------------------------------------------------------

    def set_adapter(self, name: Optional[str]) -> None:
        """Make `name` (None: no adapter) the adapter every row uses."""
        if name is not None:
            self._known(name)
        if self.merged is not None and name != self.merged:
            raise ConfigError(f"adapter {self.merged!r} is merged into the base; call unmerge() before switching "
                              f"to {name!r}")
        for layer in self._layers().values():
            layer.active = name
        self._active = name

    def use_adapters(self, rows: Sequence[Optional[str]], method: Method = "auto"):
        """Context manager: batch row i uses adapter rows[i] (None: the base) in every forward inside.

        `method` picks the mixed-batch kernel (concat | gather, see multi_lora.py); results agree.
        """
        for n in rows:
            if n is not None:
                self._known(n)
        if self.merged is not None:
            raise ConfigError(f"adapter {self.merged!r} is merged into the base; call unmerge() before mixed batches")
        return use_adapters(self.model, rows, method)

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """The base alone inside the block (refused while an adapter is merged: its delta is in the weights)."""
        if self.merged is not None:
            raise ConfigError(f"adapter {self.merged!r} is merged into the base; call unmerge() first")
        layers = self._layers().values()
        before = [layer.enabled for layer in layers]
        for layer in layers:
            layer.enabled = False
        try:
            yield
        finally:
            for layer, was in zip(layers, before):
                layer.enabled = was

    # ---- merging --------------------------------------------------------------------------------

    @property
    def merged(self) -> Optional[str]:
        return next((layer.merged for layer in self._layers().values() if layer.merged is not None), None)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter into the base weights: W ← cast(W + s·B·A), computed in fp32."""
        name = self._active
        if name is None:
            raise ConfigError("merge(): no active adapter; call set_adapter(name) first")
        if self.merged is not None:
            raise ConfigError(f"adapter {self.merged!r} is already merged; unmerge() first")
        layers = {n: m for n, m in self._layers().items() if name in m.adapters}
        quantized = [n for n, m in layers.items() if isinstance(m.base_layer, NF4Linear)]
        if quantized:
            raise ConfigError(f"merge(): {quantized[0]} is 4-bit (NF4); merging into it would need requantization, "
                              "which adds rounding error to the adapter. Load the base unquantized (quant none), or "
                              "write a merged bf16/fp32 model with `qtrain merge`")
        for path, layer in layers.items():
            weight = layer.base_layer.weight
            self._saved[path] = weight.detach().clone()
            weight.copy_((weight.float() + layer.delta(name).to(weight.device)).to(weight.dtype))
            layer.merged = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact base weights saved by `merge()` (bit for bit)."""
        for path, layer in self._layers().items():
            if layer.merged is not None:
                layer.base_layer.weight.copy_(self._saved.pop(path))
                layer.merged = None

    # ---- helpers --------------------------------------------------------------------------------

    def _layers(self) -> dict[str, MultiLoRALinear]:
        return multi_lora_modules(self.model)

    def _known(self, name: str) -> None:
        if name not in self.configs:
            loaded = ", ".join(self.configs) or "none"
            raise ConfigError(f"adapter {name!r} is not loaded (loaded: {loaded}); add it with add_adapter(name, dir)")
