"""The unit a batch is made of: one training sequence, possibly several whole rows packed together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from qtrain.data.formats import IGNORE_INDEX


@dataclass
class Example:
    """One training sequence; `labels` is -100 where no loss is taken.

    `segments` is None for a single row, or the lengths of the whole rows packed into this
    sequence, in order (they sum to its length). Each segment is its own document: its position
    ids restart at 0, attention never crosses a segment boundary, and its first label is -100
    (nothing before it in the same document predicts it).
    """

    input_ids: list[int]
    labels: list[int]
    segments: Optional[tuple[int, ...]] = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    def segment_lengths(self) -> tuple[int, ...]:
        """The rows this sequence is made of (one segment when it is not packed)."""
        return self.segments if self.segments is not None else (len(self.input_ids),)

    def position_ids(self) -> list[int]:
        """0, 1, ... restarting at every segment."""
        return [p for n in self.segment_lengths() for p in range(n)]


@dataclass
class Seq2SeqExample(Example):
    """One encoder-decoder training pair: `input_ids` is the encoder's input, `labels` the decoder's
    target (its own length; the decoder reads it shifted right). Its length is the encoder's."""


def concat_rows(rows: list[tuple[list[int], list[int]]]) -> Example:
    """Whole rows packed into one sequence, each row's first label masked (see `Example.segments`)."""
    ids: list[int] = []
    labels: list[int] = []
    for row_ids, row_labels in rows:
        ids.extend(row_ids)
        labels.append(IGNORE_INDEX)
        labels.extend(row_labels[1:])
    return Example(ids, labels, tuple(len(r) for r, _ in rows))
