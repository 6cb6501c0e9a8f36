"""Bin-pack whole rows into sequences of at most max_len tokens (best-fit decreasing, seeded ties).

A row is never cut across sequences and never sees another row: the sequence records where each
row starts (Example.segments) and batches carry per-row position ids (see collate). Best-fit
decreasing fills bins to within a few percent of max_len on instruction data, where greedy
concatenation in file order would leave far more padding or split rows.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from qtrain.data.example import Example, concat_rows
from qtrain.data.sampler import derive_seed


def best_fit_decreasing(lengths: np.ndarray, capacity: int, seed: int | str,
                        progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Bins of item positions, as (offsets, items): bin b holds items[offsets[b]:offsets[b + 1]].

    Items go in by decreasing length (equal lengths in an order drawn from `seed`), each into the
    open bin it fills best (least room left after it), or a new bin. Open bins are kept by their
    free room in a sorted list, so each placement is a bisection, not a scan.

    Raises:
        ValueError: an item is longer than `capacity` (rows are cut or dropped before packing).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and int(lengths.max()) > capacity:
        raise ValueError(f"an item of length {int(lengths.max())} does not fit in bins of {capacity}")
    ties = np.random.default_rng(derive_seed(seed, "bfd")).permutation(lengths.size)
    order = np.lexsort((ties, -lengths))
    bins: list[list[int]] = []
    rooms: list[int] = []             # sorted free room values that have an open bin
    open_by_room: dict[int, list[int]] = {}
    placing = zip(order.tolist(), lengths[order].tolist())
    for item, length in tqdm(placing, total=lengths.size, desc="data: pack", unit="row", disable=not progress,
                             mininterval=1.0):
        at = bisect_left(rooms, length)
        if at == len(rooms):
            b, room = len(bins), capacity
            bins.append([])
        else:
            room = rooms[at]
            stack = open_by_room[room]
            b = stack.pop()
            if not stack:
                del rooms[at], open_by_room[room]
        bins[b].append(item)
        left = room - length
        if left > 0:
            if left in open_by_room:
                open_by_room[left].append(b)
            else:
                open_by_room[left] = [b]
                insort(rooms, left)
    offsets = np.zeros(len(bins) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in bins])
    items = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=int(offsets[-1]))
    return offsets, items


def pack(examples: Sequence[Example], max_len: int, seed: int | str) -> list[Example]:
    """Whole examples bin-packed into sequences of <= max_len tokens (see `best_fit_decreasing`)."""
    lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
    offsets, items = best_fit_decreasing(lengths, max_len, seed)
    return [concat_rows([(examples[i].input_ids, examples[i].labels) for i in items[a:b].tolist()])
            for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
