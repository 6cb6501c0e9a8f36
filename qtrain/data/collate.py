"""Pad a micro-batch of sequences into tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from qtrain.data.formats import IGNORE_INDEX


class Sequenced(Protocol):
    input_ids: list[int]
    labels: list[int]


def collate(examples: Sequence[Sequenced], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `examples` to the longest one.

    Returns:
        input_ids (padded with `pad_id`), attention_mask (1 on real tokens) and labels
        (padded with -100), each a [batch, longest] long tensor.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        if len(example.labels) != n:
            raise ValueError(f"example {row}: {n} input_ids but {len(example.labels)} labels")
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
