"""The one hook through which methods that change the sequence take part in every model call.

Prompt tuning prepends virtual token embeddings; prefix tuning gives every attention layer
key/value prefixes through the model's cache API. Such a method attaches a `SequenceAdapter`
module to the model (as `model.sequence_adapter`), and every path that calls the model with a
batch of token ids goes through `prepare_call` (or `model_logits`): the training and eval losses
(qtrain.train.loss.batch_logits) and generation's prefill (qtrain.infer.decode). Nothing else
knows which method is active; without an adapter the call is unchanged.

The contract of `SequenceAdapter.transform(model, kwargs, generation)`: take the kwargs of a
model call holding `input_ids` and `attention_mask` (plus, for an encoder-decoder model, the
decoder's own inputs, which stay untouched) and return (kwargs to call the model with, number of
virtual positions prepended to the *output*). The returned attention mask covers the virtual
positions, so a caller that continues the sequence (KV-cached generation) extends that mask.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import PreTrainedModel

from qtrain.errors import CheckpointError, ConfigError
from qtrain.peft.artifact import load_named
from qtrain.peft.holder import AdapterHolder

ATTR = "sequence_adapter"


class SequenceAdapter(nn.Module):
    """Base of the modules prompt/prefix tuning attach to a model; see the module docstring."""

    def transform(self, model: nn.Module, kwargs: dict, generation: bool) -> tuple[dict, int]:
        raise NotImplementedError


class SequenceAdapters(SequenceAdapter, AdapterHolder):
    """Named prompt/prefix adapters of an inference model (an AdapterSet's), one active or one per row.

    A per-row route needs the adapters' class to implement `transform_rows(model, kwargs, per_row,
    generation)` (prompt tuning does; prefix tuning's per-layer caches are one per batch)."""

    kind = "prefix tuning"

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active: Optional[str] = None
        self.enabled = True
        self._rows: Optional[list[Optional[str]]] = None

    def set_route(self, rows, method: str = "auto") -> None:
        mine = [r if r in self.adapters else None for r in rows] if rows is not None else None
        self._rows = None
        if mine is not None and len(set(mine)) > 1:
            kinds = {type(self.adapters[r]) for r in mine if r is not None}
            if len(kinds) == 1 and hasattr(next(iter(kinds)), "transform_rows"):
                self._routed, self._route_single, self._rows = True, None, mine
                return
        AdapterHolder.set_route(self, mine, method)

    def transform(self, model: nn.Module, kwargs: dict, generation: bool) -> tuple[dict, int]:
        if self._rows is not None and self.enabled:
            per_row = [self.adapters[r] if r is not None else None for r in self._rows]
            kind = type(next(a for a in per_row if a is not None))
            return kind.transform_rows(model, kwargs, per_row, generation)
        name = self.current()
        if name is None or name not in self.adapters:
            return kwargs, 0
        return self.adapters[name].transform(model, kwargs, generation)


def sequence_holder(model: nn.Module) -> SequenceAdapters:
    """The model's SequenceAdapters (created on first use); refused over a training adapter."""
    current = getattr(model, ATTR, None)
    if current is None:
        attach(model, SequenceAdapters())
    elif not isinstance(current, SequenceAdapters):
        raise ConfigError("this model has a prompt/prefix adapter attached for training; load saved adapters "
                          "onto a model without one")
    return getattr(model, ATTR)


def attach_saved(model: nn.Module, name: str, adapter: SequenceAdapter, params: dict, tensors: dict,
                 source: str) -> None:
    """Load `tensors` into `adapter`'s `params` (strict), then hold it in the model's SequenceAdapters as `name`."""
    try:
        load_named(params, tensors, what="sequence adapter")
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    sequence_holder(model).adapters[name] = adapter.requires_grad_(False)


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a DDP / DeepSpeed wrapper (those keep it as `.module`; DeepSpeed's
    engine also has a `config` of its own and passes unknown attributes through to the model)."""
    while not isinstance(model, PreTrainedModel) and isinstance(model.__dict__.get("_modules", {}).get("module"),
                                                                nn.Module):
        model = model.module
    return model


def sequence_adapter(model: nn.Module) -> Optional[SequenceAdapter]:
    adapter = getattr(unwrap(model), ATTR, None)
    return adapter if isinstance(adapter, SequenceAdapter) else None


def attach(model: nn.Module, adapter: SequenceAdapter) -> None:
    """Register `adapter` on the model (its parameters become the model's, so DDP and the optimizer see them)."""
    model.add_module(ATTR, adapter)


PACKED_REFUSAL = ("prompt/prefix tuning puts its virtual positions before each row, which packed or padding-free "
                  "batches (several rows in one, told apart by position_ids) cannot hold; set data.packing: false "
                  "and data.padding_free: false")


def prepare_call(model: nn.Module, kwargs: dict, generation: bool = False) -> tuple[dict, int]:
    """(kwargs for `model(**kwargs)`, virtual positions prepended to the output) with the model's
    sequence method applied; the kwargs unchanged and 0 without one.

    Raises:
        ConfigError: an active adapter met a packed or padding-free batch (one with position_ids):
            its rows are segments of one sequence, and virtual positions would go before the first only.
    """
    adapter = sequence_adapter(model)
    if adapter is None:
        return kwargs, 0
    call, virtual = adapter.transform(unwrap(model), kwargs, generation)
    if call is not kwargs and "position_ids" in kwargs:
        raise ConfigError(PACKED_REFUSAL)
    return call, virtual


def model_logits(model: nn.Module, kwargs: dict) -> torch.Tensor:
    """`model(**kwargs).logits` through the hook, virtual positions cut off: one logit row per real token."""
    call, virtual = prepare_call(model, kwargs)
    logits = model(**call).logits
    return logits[:, virtual:] if virtual else logits
