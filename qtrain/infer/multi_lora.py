"""`MultiLoRALinear`: one frozen base linear (dense or NF4) holding several named LoRA adapters.

Three ways to run it, chosen per forward:

- no adapter (`active is None`, adapters disabled, or a merged adapter): the base alone;
- one adapter for the whole batch (`active = name`, or a route whose rows all name it): the same
  `lora_linear` call `LoRALinear` makes, so a converted model gives the same logits bit for bit;
- a *route*, one adapter name (or None) per batch row, set by `use_adapters(model, rows)`: the
  base GEMM runs once for the whole batch and each row gets its own low-rank update, computed
  in the same forward by one of two methods:

  * ``concat``: the routed adapters' A are stacked into one [R, K] matrix (R = sum of their
    ranks) and their s·B into one [N, R]; y += ((x·Aᵀ) ⊙ mask_row)·Bᵀ, where each row's mask keeps
    only its adapter's R-slice. Two plain GEMMs; each adapter's weights are read once per step,
    however many rows use it. Costs R/r times the LoRA FLOPs of one adapter.
  * ``gather``: per-row A and B are gathered from [n+1, K, r_max] / [n+1, r_max, N] stacks (slot 0
    all zeros: no adapter) and applied with two `bmm`s: LoRA FLOPs of one adapter per row, plus
    a copy of batch × r_max × (K+N) weights per forward.

  `auto` takes ``concat`` while R <= CONCAT_MAX_RANK (few distinct adapters, the common case) and
  ``gather`` beyond, where concat's R/r extra FLOPs would outgrow gather's copies. Measured on CPU
  (hidden 1024 x 8 layers, bf16, batch 4, 4 adapters r=16, 1 thread, 16 decoded tokens): single
  adapter 0.64 s, concat 0.66 s, gather 0.68 s; a first gather version that cast the fp32 stacks
  to bf16 on every forward took 0.84 s (1.36x), hence the per-dtype caches below.

A row with no adapter gets exactly zero added, so it equals the base bit for bit. Adapters are
read-only fp32 buffers; copies in the compute dtype are cached on first use.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Iterator, Literal, Optional, Sequence

import torch
from torch import nn

from qtrain.errors import ConfigError
from qtrain.peft.lora import LoRALinear, compute_dtype
from qtrain.quant.linear import dense_weight_fn
from qtrain_kernels.lora_linear import lora_linear

NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
CONCAT_MAX_RANK = 256
Method = Literal["auto", "concat", "gather"]


def check_adapter_name(name: str) -> str:
    """Adapter names become module keys (no dots) and CLI/JSON values: letters, digits, '_' and '-'."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(f"adapter name {name!r}: use letters, digits, '_' and '-' only (e.g. --adapter sql=DIR)")
    return name


class LoRAWeights(nn.Module):
    """One adapter's tensors for one layer: A [r, K], B [N, r] and its scale, as buffers (never trained)."""

    def __init__(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.register_buffer("lora_A", lora_a.detach().clone())
        self.register_buffer("lora_B", lora_b.detach().clone())
        self.scale = float(scale)

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]


@dataclass
class _Route:
    """A per-row routing resolved for one layer; tensors in the compute dtype are built on first use."""

    names: list[str]             # this layer's adapters the route uses, in slot order
    slots: list[int]             # per row: 0 = no adapter here, i = names[i - 1]
    method: str                  # concat | gather (never auto here)
    single: Optional[str]        # every row uses this one adapter: the plain path
    cache: dict = field(default_factory=dict)


class MultiLoRALinear(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters = nn.ModuleDict()
        self.active: Optional[str] = None
        self.enabled = True
        self.merged: Optional[str] = None
        self._route: Optional[_Route] = None
        self._cast: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._weight_fn = dense_weight_fn(base)

    @property
    def weight(self):
        """The frozen base weight when it is dense (None for an NF4 base), for model code that reads
        `layer.weight` of a linear: T5's feed-forward casts its input to `wo.weight.dtype`."""
        return getattr(self.base_layer, "weight", None)

    @property
    def device(self) -> torch.device:
        return next(iter(list(self.base_layer.parameters()) + list(self.base_layer.buffers()))).device

    def add(self, name: str, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> None:
        r = lora_a.shape[0]
        if tuple(lora_a.shape) != (r, self.in_features) or tuple(lora_b.shape) != (self.out_features, r):
            raise ValueError(f"A {tuple(lora_a.shape)} / B {tuple(lora_b.shape)} do not fit a "
                             f"{self.in_features}->{self.out_features} linear")
        device = self.device
        self.adapters[name] = LoRAWeights(lora_a.to(device, torch.float32), lora_b.to(device, torch.float32), scale)
        self._cast.clear()

    def remove(self, name: str) -> None:
        if name in self.adapters:
            del self.adapters[name]
        self._cast.clear()

    # ---- routing ------------------------------------------------------------------------------

    def set_route(self, rows: Optional[Sequence[Optional[str]]], method: Method = "auto") -> None:
        """Per-row adapter names for the next forwards (None clears); names this layer lacks mean 'none'."""
        if rows is None:
            self._route = None
            return
        names = [n for n in dict.fromkeys(rows) if n is not None and n in self.adapters]
        slot_of = {n: i + 1 for i, n in enumerate(names)}
        slots = [slot_of.get(n, 0) if n is not None else 0 for n in rows]
        single = names[0] if len(names) == 1 and all(s == 1 for s in slots) else None
        if method == "auto":
            total_rank = sum(self.adapters[n].r for n in names)
            method = "concat" if total_rank <= CONCAT_MAX_RANK else "gather"
        self._route = _Route(names, slots, method, single)

    def _compute_weights(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of `name` in `dtype`, cast once. Built outside inference mode, so usable anywhere."""
        w = self.adapters[name]
        key = (name, dtype, w.lora_A.device)   # the buffers move with .to(); this cache does not
        if key not in self._cast:
            with torch.inference_mode(False), torch.no_grad():
                self._cast[key] = (w.lora_A.to(dtype), w.lora_B.to(dtype))
        return self._cast[key]

    def _route_tensors(self, route: _Route, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        key = (dtype, self.device)
        if key in route.cache:
            return route.cache[key]
        ws = [self.adapters[n] for n in route.names]
        device = self.device
        with torch.inference_mode(False), torch.no_grad():
            if route.method == "concat":
                a_t = torch.cat([w.lora_A for w in ws]).t().contiguous()              # [K, R]
                b_t = torch.cat([w.lora_B * w.scale for w in ws], dim=1).t().contiguous()  # [R, N]
                bounds = [0]
                for w in ws:
                    bounds.append(bounds[-1] + w.r)
                mask = torch.zeros(len(route.slots), bounds[-1], device=device)
                for row, slot in enumerate(route.slots):
                    if slot:
                        mask[row, bounds[slot - 1]:bounds[slot]] = 1.0
                tensors = (a_t.to(dtype), b_t.to(dtype), mask.to(dtype)[:, None, :])
            else:
                r_max = max(w.r for w in ws)
                a_t = torch.zeros(len(ws) + 1, self.in_features, r_max, device=device)
                b_t = torch.zeros(len(ws) + 1, r_max, self.out_features, device=device)
                for i, w in enumerate(ws, start=1):
                    a_t[i, :, : w.r] = w.lora_A.t()
                    b_t[i, : w.r] = (w.lora_B * w.scale).t()
                slots = torch.tensor(route.slots, dtype=torch.long, device=device)
                tensors = (a_t.to(dtype), b_t.to(dtype), slots)
        route.cache[key] = tensors
        return tensors

    # ---- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        x = x.to(dtype)
        bias = getattr(self.base_layer, "bias", None)
        bias = None if bias is None else bias.to(dtype)
        route = self._route
        if not self.enabled or self.merged is not None or (route is not None and not route.names):
            return lora_linear(x, self._weight_fn, bias)
        if route is not None and route.single is None:
            return self._routed(x, bias, route)
        name = route.single if route is not None else self.active
        if name is None or name not in self.adapters:
            return lora_linear(x, self._weight_fn, bias)
        a, b = self._compute_weights(name, dtype)
        return lora_linear(x, self._weight_fn, bias, a, b, self.adapters[name].scale)

    def _routed(self, x: torch.Tensor, bias: Optional[torch.Tensor], route: _Route) -> torch.Tensor:
        if x.dim() != 3 or x.shape[0] != len(route.slots):
            raise RuntimeError(f"use_adapters() routed {len(route.slots)} rows, but this layer got input of "
                               f"shape {tuple(x.shape)}; expected [{len(route.slots)}, seq, {self.in_features}]")
        y = lora_linear(x, self._weight_fn, bias)
        if route.method == "concat":
            a_t, b_t, mask = self._route_tensors(route, x.dtype)
            xa = torch.matmul(x, a_t).mul_(mask)                                   # [batch, seq, R]
            return torch.addmm(y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]), b_t).view(y.shape)
        a_t, b_t, slots = self._route_tensors(route, x.dtype)
        xa = torch.bmm(x, a_t.index_select(0, slots))                              # [batch, seq, r]
        return torch.baddbmm(y, xa, b_t.index_select(0, slots))

    # ---- merge --------------------------------------------------------------------------------

    def delta(self, name: str) -> torch.Tensor:
        """scale · B · A in fp32, [N, K]."""
        w = self.adapters[name]
        return (w.lora_B.float() @ w.lora_A.float()) * w.scale

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={w.r}" for n, w in self.adapters.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={{{ranks}}}"


def multi_lora_modules(model: nn.Module) -> dict[str, MultiLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}


def wrap_linear(model: nn.Module, name: str) -> MultiLoRALinear:
    """Replace the linear (or `LoRALinear`, keeping only its base) at `name` by a `MultiLoRALinear`."""
    module = model.get_submodule(name)
    if isinstance(module, MultiLoRALinear):
        return module
    base = module.base_layer if isinstance(module, LoRALinear) else module
    wrapped = MultiLoRALinear(base)
    model.set_submodule(name, wrapped)
    return wrapped


def convert_lora_model(model: nn.Module, name: str = "default") -> dict[str, MultiLoRALinear]:
    """Turn every `LoRALinear` of `model` into a `MultiLoRALinear` holding its weights as adapter `name`.

    Module instances are replaced; the frozen base layers are reused, not copied.
    """
    check_adapter_name(name)
    out = {}
    for path, mod in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        wrapped = wrap_linear(model, path)
        wrapped.add(name, mod.lora_A.weight, mod.lora_B.weight, mod.scale)
        out[path] = wrapped
    return out


@contextlib.contextmanager
def use_adapters(model: nn.Module, rows: Sequence[Optional[str]], method: Method = "auto") -> Iterator[None]:
    """Within the block, batch row i of every forward uses adapter `rows[i]` (None: the base alone).

    The route is set on the model's `MultiLoRALinear` instances and cleared on exit; nothing global.
    `method` picks the mixed-batch kernel (see the module docstring); results agree either way.
    """
    if method not in ("auto", "concat", "gather"):
        raise ValueError(f"method={method!r}: expected auto, concat or gather")
    layers = multi_lora_modules(model)
    for layer in layers.values():
        layer.set_route(list(rows), method)
    try:
        yield
    finally:
        for layer in layers.values():
            layer.set_route(None)
