"""Eval loss and perplexity: the mean next-token NLL over every trained token of the eval split."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from qtrain.data import collate
from qtrain.data.pipeline import Example
from qtrain.train.loss import causal_lm_loss_sum, count_trained_tokens


@dataclass
class LossResult:
    loss: float          # mean NLL per trained token (nats)
    perplexity: float    # exp(loss)
    tokens: int          # trained tokens the mean is over
    sequences: int


def autocast_context(device: torch.device, dtype: Optional[torch.dtype]):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def perplexity_of(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@torch.inference_mode()
def eval_loss(model: nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int,
              device: torch.device, autocast_dtype: Optional[torch.dtype] = None) -> LossResult:
    """Token-weighted mean NLL over `examples` (labels -100 are not counted), as training's eval does."""
    if not examples:
        raise ValueError("eval_loss needs at least one example")
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
        with autocast_context(device, autocast_dtype):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        total += float(causal_lm_loss_sum(logits, batch["labels"]))
        count += count_trained_tokens(batch["labels"])
    loss = total / max(1, count)
    return LossResult(loss, perplexity_of(loss), count, len(examples))
