"""Where saved adapters live in a model at inference: modules holding several named adapters.

Each method's `attach` (qtrain.peft.method) puts a loaded adapter into holders of its kind:
linear layers (LoRA, DoRA, (IA)³, BitFit, diff pruning, sequential bottleneck/compacter adapters)
into `MultiAdapterLinear`s, parallel adapters into the FFN's `ParallelAdapters`, prompt/prefix
tuning into the model's `SequenceAdapters`, layer freezing into `FreezeBlocks`. An `AdapterSet`
(qtrain.infer) then drives every holder the same way: choose the active adapter, disable all,
route one adapter per batch row, merge into the weights; a holder refuses what its kind cannot
do, with the reason.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from torch import nn

from qtrain.errors import ConfigError

NAME_RE = re.compile(r"[A-Za-z0-9_-]+")


def check_adapter_name(name: str) -> str:
    """Adapter names become module keys (no dots) and CLI/JSON values: letters, digits, '_' and '-'."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(f"adapter name {name!r}: use letters, digits, '_' and '-' only (e.g. --adapter sql=DIR)")
    return name


class AdapterHolder:
    """Mixin of the holder modules: adapters by name in `self.adapters` (a ModuleDict); `active` is the
    adapter every row uses (None: none)."""

    active: Optional[str] = None
    enabled: bool = True
    merged: Optional[str] = None

    def adapter_names(self) -> list[str]:
        return list(self.adapters)

    def set_active(self, name: Optional[str]) -> None:
        self.active = name

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled

    def set_route(self, rows: Optional[Sequence[Optional[str]]], method: str = "auto") -> None:
        """Per-row adapter names for the next forwards (None clears). The default allows a route only
        when it is one adapter (or none) for every row of this holder."""
        mine = {r for r in rows or [] if r in self.adapter_names()}
        if rows is not None and (len(mine) > 1 or (mine and any(r not in mine for r in rows))):
            raise ConfigError(f"rows use {sorted(map(str, set(rows)))}, but {self.kind} adapters cannot differ from "
                              f"row to row; mixed batches work for LoRA, (IA)³ and prompt tuning")
        self._routed = rows is not None
        self._route_single = next(iter(mine)) if mine else None

    def current(self) -> Optional[str]:
        """The adapter the next forward uses (a route's, else the active one), None when disabled."""
        if not self.enabled:
            return None
        return self._route_single if getattr(self, "_routed", False) else self.active

    def remove(self, name: str) -> None:
        if name in self.adapters:
            del self.adapters[name]

    def merge(self, name: str) -> None:
        raise ConfigError(f"{self.kind} adapters cannot be merged into the weights: {self.merge_refusal}")

    def unmerge(self) -> None:
        self.merged = None

    kind = "these"
    merge_refusal = "they are not a change of any weight"


def holders(model: nn.Module) -> dict[str, AdapterHolder]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterHolder)}


def strip_holders(module: nn.Module, keep: tuple[type, ...] = ()) -> None:
    """Remove every holder submodule of `module` (except `keep` kinds) and the forward hooks bound to them:
    a copy of a block made for one adapter must not carry the others."""
    for name, holder in [(n, m) for n, m in module.named_modules() if n and isinstance(m, AdapterHolder)
                         and not isinstance(m, keep)]:
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        for key, hook in list(parent._forward_hooks.items()):
            if getattr(hook, "__self__", None) is holder:
                del parent._forward_hooks[key]
        delattr(parent, leaf)
