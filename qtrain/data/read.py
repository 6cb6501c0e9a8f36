"""Read a local data file into a `datasets.Dataset`, with errors a user can act on."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

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


def read_rows(path: str, *, key: str = "data.path") -> datasets.Dataset:
    """Load every row of a local .jsonl/.json/.csv/.parquet file.

    The dataset is built in a temporary cache and kept in memory, so nothing is written next
    to the user's data or into their Hugging Face cache.

    Args:
        path: the data file.
        key: the recipe key that named `path`, quoted in error messages.

    Raises:
        DataError: the file is missing, has an unsupported extension, cannot be parsed, or
            holds no rows.
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
    builder, kind = BUILDERS[ext]
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: file is empty (0 rows); point {key} at a file with data")
    try:
        ds = _load(builder, path)
    except Exception as exc:  # the library raises many types; all mean "cannot read this"
        if _has_no_rows(path, ext):
            raise DataError(f"{path}: no rows in the file; "
                            f"point {key} at a file with data") from None
        raise DataError(_unreadable_message(path, ext, kind, exc)) from None
    if ds.num_rows == 0:
        raise DataError(f"{path}: no rows in the file; point {key} at a file with data")
    return ds


def _load(builder: str, path: str) -> datasets.Dataset:
    import datasets

    with _quiet_datasets(), tempfile.TemporaryDirectory(prefix="qtrain-data-") as cache:
        # keep_in_memory: the Arrow table must outlive the temporary cache dir.
        return datasets.load_dataset(builder, data_files=path, split="train",
                                     cache_dir=cache, keep_in_memory=True)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence progress bars and the library's own error logging; we report errors ourselves."""
    import datasets
    from datasets.utils import logging as ds_logging

    bars_were_on = not datasets.are_progress_bars_disabled()
    verbosity = ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()


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
            line, why = bad
            return (f"{path}: line {line} is not a JSON object ({why}); "
                    "each line of a .jsonl file must be one JSON object: fix or remove that line")
    cause = _innermost(exc)
    return (f"{path}: cannot be read as {kind} ({type(cause).__name__}: {cause}); "
            f"check that the file is valid {kind} and its rows all have the same fields and types")


def _first_bad_jsonl_line(path: str) -> tuple[int, str] | None:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                return number, "not UTF-8 text"
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                return number, err.msg
            if not isinstance(value, dict):
                return number, f"found a JSON {type(value).__name__}"
    return None


def _innermost(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc
