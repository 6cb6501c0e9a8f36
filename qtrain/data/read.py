"""Read a local data file into a `datasets.Dataset`, with errors a user can act on."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from qtrain.errors import DataError

if TYPE_CHECKING:
    import datasets

# File extension -> (datasets builder, name used in messages).
BUILDERS = {
    ".jsonl": ("json", "JSON Lines"),
    ".json": ("json", "JSON"),
    ".csv": ("csv", "CSV"),
    ".parquet": ("parquet", "Parquet"),
}


def read_rows(path: str, *, key: str = "data.path", cache_dir: str | None = None,
              progress: bool = False) -> datasets.Dataset:
    """Load every row of a local .jsonl/.json/.csv/.parquet file.

    Without `cache_dir` the dataset is built in a temporary cache and kept in memory, so nothing
    is written next to the user's data or into their Hugging Face cache. With it, the Arrow file
    is written there and memory-mapped (for files larger than memory).

    Args:
        path: the data file.
        key: the recipe key that named `path`, quoted in error messages.
        cache_dir: where to write the Arrow file (the caller removes it).
        progress: show datasets' progress bar while the file is converted.

    Raises:
        DataError: the file is missing, has an unsupported extension, cannot be parsed, or
            holds no rows.
    """
    builder, kind = check_file(path, key)
    ext = os.path.splitext(path)[1].lower()
    try:
        ds = _load(builder, path, cache_dir, progress)
    except Exception as exc:  # the library raises many types; all mean "cannot read this"
        if _has_no_rows(path, ext):
            raise DataError(f"{path}: no rows in the file; "
                            f"point {key} at a file with data") from None
        raise DataError(_unreadable_message(path, ext, kind, exc)) from None
    if ds.num_rows == 0:
        raise DataError(f"{path}: no rows in the file; point {key} at a file with data")
    return ds


def check_file(path: str, key: str) -> tuple[str, str]:
    """(datasets builder, name of the file type) for a data file that exists and is not empty.

    Raises:
        DataError: missing, not a file, unsupported extension, or 0 bytes.
    """
    ext = os.path.splitext(path)[1].lower()
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found; check {key}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: is not a file; set {key} to a data file")
    if ext not in BUILDERS:
        supported = ", ".join(BUILDERS)
        raise DataError(f"{path}: unsupported file type {ext or '(no extension)'!r}; "
                        f"{key} must end in one of {supported}")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: file is empty (0 rows); point {key} at a file with data")
    return BUILDERS[ext]


def resolve_files(spec: str | list[str], key: str) -> list[str]:
    """The files a recipe's path entry names: a file, a glob, or a list of either, in order.

    A glob's matches are sorted, so the order (and with it the data order) does not depend on
    the filesystem.

    Raises:
        DataError: a glob that matches no file (a plain path is checked when it is read).
    """
    out: list[str] = []
    for entry in [spec] if isinstance(spec, str) else spec:
        if any(c in entry for c in "*?["):
            hits = sorted(p for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
            if not hits:
                raise DataError(f"{entry}: no file matches this pattern; check {key}")
            out.extend(hits)
        else:
            out.append(entry)
    return out


def stream_rows(path: str, key: str) -> Iterator[dict[str, Any]]:
    """The rows of a data file one at a time, without converting the whole file first (streaming).

    JSON Lines are read line by line here (a blank line is not a row, as when the whole file is
    read); other types go through datasets' streaming reader.

    Raises:
        DataError: as `read_rows`, when the bad part of the file is reached.
    """
    builder, kind = check_file(path, key)
    if path.lower().endswith(".jsonl"):
        yield from _jsonl_rows(path)
        return
    import datasets

    with quiet_datasets():
        rows = iter(datasets.load_dataset(builder, data_files=path, split="train", streaming=True))
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:  # the library raises many types; all mean "cannot read this"
            raise DataError(_unreadable_message(path, os.path.splitext(path)[1].lower(), kind, exc)) from None
        yield row


def _jsonl_rows(path: str) -> Iterator[dict[str, Any]]:
    for number, value, why in _jsonl_lines(path):
        if why is not None:
            raise DataError(_bad_line_message(path, number, why))
        yield value


def _jsonl_lines(path: str) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, row, what is wrong with it or None) for every non-blank line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield (number, *_jsonl_value(raw))


def _jsonl_value(raw: bytes) -> tuple[Any, str | None]:
    """(the row, None) for a line holding one JSON object, else (None, what is wrong with it)."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except json.JSONDecodeError as err:
        return None, err.msg
    if not isinstance(value, dict):
        return None, f"found a JSON {type(value).__name__}"
    return value, None


def _bad_line_message(path: str, line: int, why: str) -> str:
    return (f"{path}: line {line} is not a JSON object ({why}); "
            "each line of a .jsonl file must be one JSON object: fix or remove that line")


def _load(builder: str, path: str, cache_dir: str | None, progress: bool = False) -> datasets.Dataset:
    import datasets

    if cache_dir is not None:
        with quiet_datasets(bars=progress):
            return datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir)
    with quiet_datasets(), tempfile.TemporaryDirectory(prefix="qtrain-data-") as cache:
        # keep_in_memory: the Arrow table must outlive the temporary cache dir.
        return datasets.load_dataset(builder, data_files=path, split="train",
                                     cache_dir=cache, keep_in_memory=True)


@contextlib.contextmanager
def quiet_datasets(bars: bool = False) -> Iterator[None]:
    """Silence the library's own error logging (we report errors ourselves), and its progress
    bars unless `bars`."""
    import datasets
    from datasets.utils import logging as ds_logging

    bars_were_on = not datasets.are_progress_bars_disabled()
    verbosity = ds_logging.get_verbosity()
    (datasets.enable_progress_bars if bars else datasets.disable_progress_bars)()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        (datasets.enable_progress_bars if bars_were_on else datasets.disable_progress_bars)()


def _has_no_rows(path: str, ext: str) -> bool:
    """Whether a file the library refused is simply empty (blank, `[]`, a bare CSV header)."""
    try:
        if ext == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_metadata(path).num_rows == 0
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
    except Exception:
        return False
    if ext == ".csv":
        return len(lines) <= 1
    if ext == ".json":
        return "".join(lines).strip() in ("", "[]", "{}")
    return not lines


def _unreadable_message(path: str, ext: str, kind: str, exc: BaseException) -> str:
    if ext == ".jsonl":
        bad = _first_bad_jsonl_line(path)
        if bad is not None:
            return _bad_line_message(path, *bad)
    cause = _innermost(exc)
    return (f"{path}: cannot be read as {kind} ({type(cause).__name__}: {cause}); "
            f"check that the file is valid {kind} and its rows all have the same fields and types")


def _first_bad_jsonl_line(path: str) -> tuple[int, str] | None:
    return next(((number, why) for number, _, why in _jsonl_lines(path) if why is not None), None)


def _innermost(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc
