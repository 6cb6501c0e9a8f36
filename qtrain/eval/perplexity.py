"""Eval loss and perplexity: the mean NLL over every trained token of the eval split.

`qtrain.train.loss.nll_sum` is the one batched, token-weighted loop; training's periodic eval
(`qtrain.train.loop.evaluate`) and `qtrain eval` (`eval_loss`) both run it, with their own
batching and loss function.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from qtrain.data import collate
from qtrain.data.example import Example
from qtrain.models.arch import collate_start_id
from qtrain.train.loss import batch_logits, batch_loss_sum, nll_sum

Batch = dict[str, torch.Tensor]


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
              device: torch.device, autocast_dtype: Optional[torch.dtype] = None, *, flat: bool = False) -> LossResult:
    """Token-weighted mean NLL over `examples` (labels -100 are not counted), as training's eval does.

    Works for decoder-only and encoder-decoder models alike (the examples were built for the model);
    `flat`: padding-free batches (see data.collate).
    """
    if not examples:
        raise ValueError("eval_loss needs at least one example")
    model.eval()
    start = collate_start_id(model)

    def to_batch(chunk: Sequence[Example]) -> Batch:
        return {k: v.to(device) for k, v in collate(chunk, pad_id, start, flat=flat).items()}

    def loss_sum(batch: Batch) -> torch.Tensor:
        with autocast_context(device, autocast_dtype):
            logits = batch_logits(model, batch)
        return batch_loss_sum(logits, batch)

    chunks = (examples[i:i + batch_size] for i in range(0, len(examples), batch_size))
    total, count = nll_sum(chunks, to_batch, loss_sum)
    loss = total / max(1, count)
    return LossResult(loss, perplexity_of(loss), count, len(examples))
