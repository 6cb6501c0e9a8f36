"""Built data read back from Arrow files by memory map: encoded rows, and sequences as row-index lists.

Nothing is copied into Python lists until a sequence is asked for, so a million-row data set
costs a few MB of index arrays per process, and the token pages are shared by every process
on the node through the page cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from qtrain.data.example import Example, Seq2SeqExample, concat_rows


def mmap_table(path: Path) -> Any:
    """An Arrow IPC stream file (what `Dataset.map` writes) as a zero-copy, memory-mapped table."""
    import pyarrow as pa

    # Not closed here: the table's buffers point into the mapping, which lives as long as they do.
    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()


def write_sequences(path: Path, offsets: np.ndarray, members: np.ndarray) -> None:
    """Sequences as one Arrow list column `rows` (offsets + row ids): sequence i is rows[i]."""
    import pyarrow as pa

    column = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(members, pa.int64()))
    table = pa.table({"rows": column})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def read_sequences(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, row ids) written by `write_sequences`, as read-only views of the mapped file."""
    column = mmap_table(path).column("rows").combine_chunks()  # one chunk: no copy
    return column.offsets.to_numpy(), column.values.to_numpy()


class TokenRows:
    """Encoded rows (input_ids, labels) of one or more Arrow files, addressed by a global row index."""

    def __init__(self, files: Sequence[Path]) -> None:
        self._chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        starts = [0]
        trained = []
        for path in files:
            table = mmap_table(path)
            trained.append(table.column("trained").to_numpy())
            for ids, labels in zip(table.column("input_ids").chunks, table.column("labels").chunks):
                self._chunks.append((ids.offsets.to_numpy(), ids.values.to_numpy(),
                                     labels.offsets.to_numpy(), labels.values.to_numpy()))
                starts.append(starts[-1] + len(ids))
        self._starts = np.asarray(starts, dtype=np.int64)
        self.trained = np.concatenate(trained) if trained else np.zeros(0, np.int32)
        self.lengths = np.concatenate([np.diff(c[0]) for c in self._chunks]) if self._chunks else np.zeros(0)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def checksum(self) -> int:
        """Sum of every id and label: reads every page of the mapping (benchmarks make it resident so)."""
        return sum(int(values.sum(dtype=np.int64)) for _, ids, _, labels in self._chunks for values in (ids, labels))

    def row(self, index: int) -> tuple[list[int], list[int]]:
        c = int(np.searchsorted(self._starts, index, side="right")) - 1
        k = index - int(self._starts[c])
        io, iv, lo, lv = self._chunks[c]
        return iv[io[k]:io[k + 1]].tolist(), lv[lo[k]:lo[k + 1]].tolist()


class SequenceSet(Sequence):
    """Training or eval sequences: `len()` and `[i] -> Example`, read from the mapped files.

    Sequence i is the rows `members[offsets[i]:offsets[i + 1]]` of `rows`: one row when not
    packed, several whole rows packed together (an Example with `segments`) when packed.
    """

    def __init__(self, rows: TokenRows, offsets: np.ndarray, members: np.ndarray, *, packed: bool,
                 seq2seq: bool = False, keepalive: Any = None) -> None:
        self.rows, self.offsets, self.members = rows, offsets, members
        self.packed, self.seq2seq = packed, seq2seq
        self._keepalive = keepalive  # e.g. the temporary directory the files live in

    def __len__(self) -> int:
        return int(self.offsets.size) - 1

    @overload
    def __getitem__(self, i: int) -> Example: ...

    @overload
    def __getitem__(self, i: slice) -> list[Example]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} of {n}")
        i %= n
        members = self.members[self.offsets[i]:self.offsets[i + 1]].tolist()
        if self.packed:
            return concat_rows([self.rows.row(r) for r in members])
        ids, labels = self.rows.row(members[0])
        return (Seq2SeqExample if self.seq2seq else Example)(ids, labels)

    def row_lengths(self) -> np.ndarray:
        """Tokens of every row, in sequence order (a packed sequence contributes several)."""
        return self.rows.lengths[self.members]

    def lengths(self) -> np.ndarray:
        """Tokens of every sequence."""
        if len(self) == 0:
            return np.zeros(0, dtype=np.int64)
        return np.add.reduceat(self.row_lengths().astype(np.int64), self.offsets[:-1])

    def trained_tokens(self) -> int:
        return int(self.rows.trained[self.members].sum())
