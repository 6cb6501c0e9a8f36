"""Pad a micro-batch of sequences into tensors (decoder-only, or encoder-decoder pairs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from qtrain.data.formats import IGNORE_INDEX
from qtrain.data.pipeline import Seq2SeqExample


class Sequenced(Protocol):
    input_ids: list[int]
    labels: list[int]


def collate(examples: Sequence[Sequenced], pad_id: int,
            decoder_start_id: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad `examples` to the longest one.

    Returns:
        input_ids (padded with `pad_id`), attention_mask (1 on real tokens) and labels
        (padded with -100), each a [batch, longest] long tensor. `Seq2SeqExample`s go through
        `collate_seq2seq` (decoder_start_id defaults to `pad_id`, T5's).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    kinds = {isinstance(e, Seq2SeqExample) for e in examples}
    if len(kinds) > 1:
        raise ValueError("collate got decoder-only and encoder-decoder examples in one batch")
    if kinds == {True}:
        return collate_seq2seq(examples, pad_id, pad_id if decoder_start_id is None else decoder_start_id)
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


def collate_seq2seq(examples: Sequence[Sequenced], pad_id: int, decoder_start_id: int) -> dict[str, torch.Tensor]:
    """Encoder inputs and decoder targets, each right-padded to its own longest.

    Returns:
        input_ids / attention_mask [batch, longest input] for the encoder; labels [batch, longest
        target] padded with -100; decoder_input_ids, the labels shifted right one place behind
        `decoder_start_id` with padding as `pad_id` (T5's teacher forcing: logits[t] predict
        labels[t]). The decoder is causal, so its right padding never reaches a real position.
    """
    width = max(len(e.input_ids) for e in examples)
    target = max(len(e.labels) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), target), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n, m = len(example.input_ids), len(example.labels)
        if n == 0 or m == 0:
            raise ValueError(f"example {row}: an encoder-decoder example needs input_ids and labels")
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :m] = torch.tensor(example.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "decoder_input_ids": shift_right(labels, pad_id, decoder_start_id)}


def shift_right(labels: torch.Tensor, pad_id: int, decoder_start_id: int) -> torch.Tensor:
    """[start, labels[:-1]] per row, with ignored (-100) labels read as `pad_id`."""
    shifted = torch.full_like(labels, pad_id)
    shifted[:, 0] = decoder_start_id
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_id)
