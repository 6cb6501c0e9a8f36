"""Best-fit-decreasing bins, and the packed / padding-free batch layouts the collator builds."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qtrain.data import Example, collate
from qtrain.data.example import concat_rows
from qtrain.data.packing import best_fit_decreasing
from qtrain.data.pipeline import padding_fraction
from qtrain.train.loop import batch_tokens


@settings(max_examples=80, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), max_size=120), capacity=st.integers(64, 200), seed=st.integers(0, 9))
def test_bins_hold_every_item_once_within_capacity_and_no_two_would_fit_together(lengths, capacity, seed):
    offsets, items = best_fit_decreasing(np.array(lengths, dtype=np.int64), capacity, seed)
    assert sorted(items.tolist()) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in items[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    assert all(0 < load <= capacity for load in loads)
    # The best-fit guarantee: a bin was only opened when the item fitted no open bin.
    assert all(a + b > capacity for i, a in enumerate(loads) for b in loads[i + 1:])
    assert best_fit_decreasing(np.array(lengths, dtype=np.int64), capacity, seed)[1].tolist() == items.tolist()


def _packed() -> Example:
    return concat_rows([([1, 5, 6], [-100, 5, 6]), ([1, 7], [1, 7])])


def test_padded_packed_batch_restarts_positions_per_row_and_pads_as_a_trailing_segment():
    batch = collate([_packed(), Example([1, 9], [-100, 9])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 1, 7], [1, 9, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    # The second row's first token is not trained as the continuation of the first row.
    assert batch["labels"].tolist() == [[-100, 5, 6, -100, 7], [-100, 9, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch_tokens(batch) == 7


def test_flat_batch_lays_rows_end_to_end_with_no_padding_and_no_mask():
    batch = collate([_packed(), Example([1, 9], [3, 9])], pad_id=0, flat=True)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[1, 5, 6, 1, 7, 1, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 5, 6, -100, 7, -100, 9]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch_tokens(batch) == 7


def test_unpacked_padded_batch_is_unchanged_by_the_new_layouts():
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_id=0)
    assert "position_ids" not in batch  # plain rows keep the attention-mask path


def test_padding_fraction_counts_positions_padded_to_each_batch_longest():
    # One batch of lengths {4, 2}: 6 real of 8 positions, whatever the order.
    assert padding_fraction(np.array([4, 2]), 2) == 0.25
    assert padding_fraction(np.array([3, 3, 3]), 2) == 0.0
