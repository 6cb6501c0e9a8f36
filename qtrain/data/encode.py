"""Rows -> token rows, fitted to max_len: the one per-row step shared by the cached build and streaming.

Every encoded row keeps its place (dropped rows are empty), so a row's index in the output is its
index in the input: splits and error messages need no mapping. `status` says what happened to it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtrain.data.formats import IGNORE_INDEX, encode_rows
from qtrain.data.read import quiet_datasets
from qtrain.errors import DataError

# `status` bits of an encoded row.
TRUNCATED = 1          # cut to max_len (it may still be kept)
DROPPED_OVERLONG = 2   # longer than max_len under overlong: drop
DROPPED_NO_LABELS = 4  # nothing left to train
DROPPED = DROPPED_OVERLONG | DROPPED_NO_LABELS

# Below this many rows per process, a worker pool costs more than it saves.
MIN_ROWS_PER_PROC = 2000


@dataclass(frozen=True)
class EncodeSpec:
    """What decides how a row is encoded (picklable: it travels to worker processes)."""

    format: str
    max_len: int
    overlong: str
    fields: dict[str, str] = field(default_factory=dict)
    encoder_decoder: bool = False


def fit_row(ids: list[int], labels: list[int], spec: EncodeSpec) -> tuple[int, list[int], list[int]]:
    """(status, ids, labels) of one encoded row after max_len and the no-label rule.

    A causal LM never trains a row's first label (nothing before it predicts it), so it is
    masked here: the counts then say what training sees, and packed rows need no other fix.
    """
    if not spec.encoder_decoder and labels:
        labels = [IGNORE_INDEX, *labels[1:]]
    status = 0
    if max(len(ids), len(labels)) > spec.max_len:
        if spec.overlong == "drop":
            return DROPPED_OVERLONG, [], []
        ids, labels = ids[:spec.max_len], labels[:spec.max_len]
        status = TRUNCATED
    if labels.count(IGNORE_INDEX) == len(labels):
        return status | DROPPED_NO_LABELS, [], []
    return status, ids, labels


def encode_batch(rows: Sequence[Mapping[str, Any]], row_numbers: Sequence[int], source: str, spec: EncodeSpec,
                 tokenizer: Any) -> dict[str, list]:
    """Columns input_ids, labels, status and trained (count of trained labels) for `rows`.

    `row_numbers` are the rows' 1-based numbers in `source`, for error messages.
    """
    encoded = encode_rows(rows, spec.format, tokenizer, spec.fields, source=source, row_numbers=row_numbers,
                          encoder_decoder=spec.encoder_decoder)
    out: dict[str, list] = {"input_ids": [], "labels": [], "status": [], "trained": []}
    for ids, labels in encoded:
        status, ids, labels = fit_row(ids, labels, spec)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["status"].append(status)
        out["trained"].append(len(labels) - labels.count(IGNORE_INDEX))
    return out


def _map_batch(batch: Mapping[str, list], indices: list[int], *, source: str, spec: EncodeSpec,
               tokenizer: Any) -> dict[str, list]:
    columns = list(batch.keys())
    rows = [dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns))]
    return encode_batch(rows, [i + 1 for i in indices], source, spec, tokenizer)


def features():
    import datasets

    return datasets.Features({
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "status": datasets.Value("int8"),
        "trained": datasets.Value("int32"),
    })


def encode_dataset(raw: Any, source: str, key: str, spec: EncodeSpec, tokenizer: Any, out_file: Path,
                   num_proc: int, progress: bool) -> Any:
    """`raw` (a datasets.Dataset of one file's rows) encoded into `out_file` (Arrow, memory-mapped).

    Runs `Dataset.map(batched=True)` over `num_proc` processes (fewer for small files). A bad row
    stops the build with the first bad row in file order: each process takes a contiguous shard
    and the first failing shard's error is the one raised.
    """
    procs = max(1, min(num_proc, raw.num_rows // MIN_ROWS_PER_PROC))
    fn = functools.partial(_map_batch, source=source, spec=spec, tokenizer=tokenizer)
    with quiet_datasets(bars=progress), serial_tokenizers_in_workers(procs > 1):
        try:
            return raw.map(fn, batched=True, batch_size=1000, with_indices=True, remove_columns=raw.column_names,
                           features=features(), num_proc=procs if procs > 1 else None,
                           cache_file_name=str(out_file), new_fingerprint=out_file.stem, load_from_cache_file=False,
                           writer_batch_size=10_000, desc=f"data: encode {Path(source).name}")
        except UnicodeDecodeError as exc:
            raise DataError(f"{source}: not valid UTF-8 text ({exc.reason} at byte {exc.start} of a value); "
                            f"re-save the file as UTF-8 or fix the bad rows ({key})") from None


@contextlib.contextmanager
def serial_tokenizers_in_workers(forking: bool = True) -> Iterator[None]:
    """Processes forked inside this block tokenize on one thread each.

    They are already one per core: a Rust thread pool in each would oversubscribe the cores, and
    the tokenizers library warns once per forked worker when the parent had used its pool. Only
    the environment the workers inherit is changed; it is restored on exit.
    """
    if not forking:
        yield
        return
    saved = os.environ.get(_PARALLELISM)
    os.environ[_PARALLELISM] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(_PARALLELISM, None)
        else:
            os.environ[_PARALLELISM] = saved


_PARALLELISM = "TOKENIZERS_PARALLELISM"
