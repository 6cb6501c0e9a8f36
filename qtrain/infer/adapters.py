"""Hot-swap several named adapters, of any methods, over one loaded base.

    adapters = AdapterSet(model)                 # a base model, or one with LoRALinear layers
    adapters.add_adapter("sql", "runs/sql/adapter")        # LoRA
    adapters.add_adapter("chat", "runs/chat/adapter")      # (IA)³, prompt tuning, bottleneck, ...
    adapters.set_adapter("sql")                  # every row uses sql
    with adapters.use_adapters(["sql", "chat", None]):   # one forward, one adapter per row
        model(input_ids=ids)                     #   (LoRA, (IA)³ and prompt tuning rows mix)
    with adapters.disable_adapters():            # the base alone
        model(input_ids=ids)
    adapters.merge(); ...; adapters.unmerge()    # dense (bf16/fp32) bases; methods whose math allows

Each method puts its adapter into holders of its kind (qtrain.peft.holder); the set drives them
all. Merge guarantee: `merge()` keeps a copy of every base weight and bias it changes and
`unmerge()` puts them back, so unmerging restores the base bit for bit (subtracting the delta
again would not: floating-point addition does not undo exactly).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from qtrain.config.schema import PeftConfig
from qtrain.errors import CheckpointError, ConfigError
from qtrain.infer.multi_lora import Method as RouteMethod
from qtrain.infer.multi_lora import check_adapter_name, convert_lora_model, use_adapters
from qtrain.peft.artifact import read_adapter
from qtrain.peft.holder import AdapterHolder, holders
from qtrain.peft.lora import LoRALinear
from qtrain.peft.method import Method
from qtrain.peft.multi_linear import MultiAdapterLinear
from qtrain.peft.registry import get_method, method_of_artifact
from qtrain.quant.linear import NF4Linear

DEFAULT_NAME = "default"


class AdapterSet:
    """Named adapters over one frozen base; see the module docstring for the API and merge guarantee."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.configs: dict[str, PeftConfig] = {}
        self.sources: dict[str, str] = {}
        self.methods: dict[str, Method] = {}
        first = next((m for m in model.modules() if type(m) is LoRALinear), None)
        if first is not None:  # a model with LoRA injected: its weights become adapter "default"
            layers = convert_lora_model(model, DEFAULT_NAME)
            self.configs[DEFAULT_NAME] = PeftConfig(r=first.r, alpha=first.alpha, rslora=first.rslora,
                                                    targets=sorted({n.rsplit(".", 1)[-1] for n in layers}))
            self.sources[DEFAULT_NAME] = "(LoRA layers of the model)"
            self.methods[DEFAULT_NAME] = get_method("lora")
        self._active: Optional[str] = None
        self._saved: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
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
        """Load an adapter dir of any method (its adapter_config.json says which) as `name`; returns the config."""
        check_adapter_name(name)
        if name in self.configs:
            raise ConfigError(f"adapter name {name!r} is already loaded (from {self.sources[name]}); pick another name")
        path = Path(adapter_dir)
        if not path.is_dir():
            raise CheckpointError(f"adapter dir not found: {path} (pass the adapter/ dir a training run wrote)")
        config, tensors = read_adapter(path)
        method = method_of_artifact(config, str(path / "adapter_config.json"))
        try:
            cfg = method.config_from_artifact(config)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path / 'adapter_config.json'}: cannot read the {method.name} settings "
                                  f"({exc!r}); it was not written by qtrain or peft for this method") from None
        method.attach(self.model, name, cfg, tensors, str(path))
        self.configs[name], self.sources[name], self.methods[name] = cfg, str(path), method
        self._apply(self._active)
        return config

    def remove_adapter(self, name: str) -> None:
        self._known(name)
        if self._active == name:
            self.set_adapter(None)
        for holder in self._holders():
            holder.remove(name)
        del self.configs[name], self.sources[name], self.methods[name]

    # ---- choosing -------------------------------------------------------------------------------

    def set_adapter(self, name: Optional[str]) -> None:
        """Make `name` (None: no adapter) the adapter every row uses."""
        if name is not None:
            self._known(name)
        if self.merged is not None and name != self.merged:
            raise ConfigError(f"adapter {self.merged!r} is merged into the base; call unmerge() before switching "
                              f"to {name!r}")
        self._apply(name)

    def use_adapters(self, rows: Sequence[Optional[str]], method: RouteMethod = "auto"):
        """Context manager: batch row i uses adapter rows[i] (None: the base) in every forward inside.

        Rows may mix LoRA, (IA)³ and prompt-tuning adapters; other methods serve a whole batch
        (a ConfigError says which). `method` picks the LoRA mixed-batch kernel (concat | gather).
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
        layers = self._holders()
        before = [h.enabled for h in layers]
        for h in layers:
            h.set_enabled(False)
        try:
            yield
        finally:
            for h, was in zip(layers, before):
                h.set_enabled(was)

    # ---- merging --------------------------------------------------------------------------------

    @property
    def merged(self) -> Optional[str]:
        return next((h.merged for h in self._holders() if h.merged is not None), None)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter into the base weights (computed in fp32; see each method's math)."""
        name = self._active
        if name is None:
            raise ConfigError("merge(): no active adapter; call set_adapter(name) first")
        if self.merged is not None:
            raise ConfigError(f"adapter {self.merged!r} is already merged; unmerge() first")
        method = self.methods[name]
        if method.merge_refusal:
            raise ConfigError(f"merge(): adapter {name!r} is {method.name}: {method.merge_refusal}")
        layers = {n: h for n, h in self._holders_by_name().items() if name in h.adapter_names()}
        quantized = [h for h in layers.values() if isinstance(h, MultiAdapterLinear) and
                     isinstance(h.base_layer, NF4Linear)]
        if quantized:  # refuse before anything changes
            quantized[0].merge(name)
        for path, holder in layers.items():
            if isinstance(holder, MultiAdapterLinear):
                base = holder.base_layer
                self._saved[path] = (base.weight.detach().clone(),
                                     None if base.bias is None else base.bias.detach().clone())
            holder.merge(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact base weights (and biases) saved by `merge()`, bit for bit."""
        for path, holder in self._holders_by_name().items():
            if holder.merged is None:
                continue
            if path in self._saved:
                weight, bias = self._saved.pop(path)
                holder.base_layer.weight.copy_(weight)
                if bias is None:
                    holder.base_layer.bias = None
                else:
                    holder.base_layer.bias.copy_(bias)
            holder.unmerge()

    # ---- helpers --------------------------------------------------------------------------------

    def _apply(self, name: Optional[str]) -> None:
        for holder in self._holders():
            holder.set_active(name)
        self._active = name

    def _holders(self) -> list[AdapterHolder]:
        return list(holders(self.model).values())

    def _holders_by_name(self) -> dict[str, AdapterHolder]:
        return holders(self.model)

    def _known(self, name: str) -> None:
        if name not in self.configs:
            loaded = ", ".join(self.configs) or "none"
            raise ConfigError(f"adapter {name!r} is not loaded (loaded: {loaded}); add it with add_adapter(name, dir)")
