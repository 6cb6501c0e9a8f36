"""A micro-batch of sequences as tensors: padded rows, one flat padding-free row, or encoder-decoder pairs.

Packed sequences (and the flat row) carry per-row `position_ids` that restart at 0 at every row
boundary. With position ids and no attention mask, transformers' mask construction
(`masking_utils.find_packed_sequence_indices`) makes attention block-diagonal for sdpa/eager,
and flash-attention runs its varlen kernel from them: rows never attend to each other.
`train.loss.batch_logits` passes exactly that (see `model_inputs`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qtrain.data.example import Example, Seq2SeqExample
from qtrain.data.formats import IGNORE_INDEX


def collate(examples: Sequence[Example], pad_id: int, decoder_start_id: int | None = None, *,
            flat: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad `examples` to the longest one, or (`flat`) lay them end to end in one row.

    Returns:
        input_ids (padded with `pad_id`), attention_mask (1 on real tokens) and labels
        (padded with -100), each a [batch, longest] long tensor; packed examples (with
        `segments`) add position_ids. `flat` gives [1, total] input_ids, labels and position_ids
        and no attention_mask (nothing is padding). `Seq2SeqExample`s go through
        `collate_seq2seq` (decoder_start_id defaults to `pad_id`, T5's).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    kinds = {isinstance(e, Seq2SeqExample) for e in examples}
    if len(kinds) > 1:
        raise ValueError("collate got decoder-only and encoder-decoder examples in one batch")
    if kinds == {True}:
        return collate_seq2seq(examples, pad_id, pad_id if decoder_start_id is None else decoder_start_id)
    for row, example in enumerate(examples):
        if len(example.labels) != len(example.input_ids):
            raise ValueError(f"example {row}: {len(example.input_ids)} input_ids but {len(example.labels)} labels")
    if flat:
        return collate_flat(examples)
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if any(e.segments is not None for e in examples):
        # Padding after a packed row is one more segment (positions from 0): no real token sees it.
        batch["position_ids"] = torch.tensor([e.position_ids() + list(range(width - len(e.input_ids)))
                                              for e in examples], dtype=torch.long)
        batch["labels"] = _mask_segment_starts(labels, batch["position_ids"])
    return batch


def collate_flat(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """Padding-free: every example end to end in one [1, total] row, each row its own segment."""
    input_ids = torch.tensor([[t for e in examples for t in e.input_ids]], dtype=torch.long)
    labels = torch.tensor([[t for e in examples for t in e.labels]], dtype=torch.long)
    position_ids = torch.tensor([[p for e in examples for p in e.position_ids()]], dtype=torch.long)
    return {"input_ids": input_ids, "labels": _mask_segment_starts(labels, position_ids),
            "position_ids": position_ids}


def _mask_segment_starts(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """-100 on the first token of every segment: in one row, the causal shift would otherwise
    train it as the continuation of the row before."""
    return labels.masked_fill(position_ids == 0, IGNORE_INDEX)


def collate_seq2seq(examples: Sequence[Example], pad_id: int, decoder_start_id: int) -> dict[str, torch.Tensor]:
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
