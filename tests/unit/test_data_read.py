"""read_rows: every supported file type, and a DataError with a usable message for bad input."""

from __future__ import annotations

import json
import os

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qtrain.data.read import read_rows
from qtrain.errors import DataError

ROWS = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"},
        {"prompt": "e", "response": "f"}]


def _write(path, text: str | bytes) -> str:
    mode = "wb" if isinstance(text, bytes) else "w"
    with open(path, mode) as f:
        f.write(text)
    return str(path)


def _raises(path: str, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        read_rows(path, **kwargs)
    # Rephrased, not chained: the CLI shows the message alone, with no library traceback.
    err = info.value
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    return str(info.value)


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".parquet"])
def test_reads_every_supported_type_without_writing_beside_the_data(tmp_path, ext):
    path = tmp_path / f"rows{ext}"
    if ext == ".jsonl":
        _write(path, "".join(json.dumps(r) + "\n" for r in ROWS))
    elif ext == ".json":
        _write(path, json.dumps(ROWS))
    elif ext == ".csv":
        body = "".join(f"{r['prompt']},{r['response']}\n" for r in ROWS)
        _write(path, "prompt,response\n" + body)
    else:
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    before = sorted(os.listdir(tmp_path))

    ds = read_rows(str(path))

    assert ds.to_list() == ROWS
    assert sorted(os.listdir(tmp_path)) == before


def test_uppercase_extension_is_accepted(tmp_path):
    path = _write(tmp_path / "ROWS.JSONL", json.dumps(ROWS[0]) + "\n")
    assert read_rows(path).num_rows == 1


def test_leaves_datasets_progress_bars_and_logging_as_they_were(tmp_path):
    path = _write(tmp_path / "r.jsonl", json.dumps(ROWS[0]) + "\n")
    bars = datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    read_rows(path)
    with pytest.raises(DataError):
        read_rows(_write(tmp_path / "bad.jsonl", "{nope\n"))
    assert datasets.is_progress_bar_enabled() == bars
    assert datasets.logging.get_verbosity() == verbosity


def test_missing_file_names_it_and_the_recipe_key(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    msg = _raises(path)
    assert path in msg and "not found" in msg and "data.path" in msg
    assert "data.eval_path" in _raises(path, key="data.eval_path")


def test_directory_is_refused(tmp_path):
    msg = _raises(str(tmp_path))
    assert str(tmp_path) in msg and "not a file" in msg


@pytest.mark.parametrize("name", ["rows.txt", "rows.tsv", "rows"])
def test_unsupported_extension_lists_the_supported_ones(tmp_path, name):
    path = _write(tmp_path / name, "x\n")
    msg = _raises(path)
    assert path in msg
    for ext in (".jsonl", ".json", ".csv", ".parquet"):
        assert ext in msg


def test_garbled_jsonl_line_is_named(tmp_path):
    lines = [json.dumps(ROWS[0]), json.dumps(ROWS[1]), '{"prompt": "x", "response": ',
             json.dumps(ROWS[2])]
    path = _write(tmp_path / "bad.jsonl", "\n".join(lines) + "\n")
    msg = _raises(path)
    assert path in msg and "line 3" in msg and "JSON object" in msg


def test_jsonl_line_that_is_not_an_object_is_named(tmp_path):
    path = _write(tmp_path / "bad.jsonl", json.dumps(ROWS[0]) + "\n[1, 2]\n")
    msg = _raises(path)
    assert "line 2" in msg and "list" in msg


def test_non_utf8_jsonl_is_refused(tmp_path):
    path = _write(tmp_path / "bad.jsonl", json.dumps(ROWS[0]).encode() + b"\n\xff\xfe\x00garbage\n")
    msg = _raises(path)
    assert "line 2" in msg and "UTF-8" in msg


@pytest.mark.parametrize("name,content,kind", [
    ("bad.json", '[{"prompt": "a"}, {"prompt": ', "JSON"),
    ("bad.csv", 'prompt,response\n"a,b\n', "CSV"),
    ("bad.parquet", "this is not parquet", "Parquet"),
])
def test_garbled_files_are_rephrased(tmp_path, name, content, kind):
    path = _write(tmp_path / name, content)
    msg = _raises(path)
    assert path in msg and f"cannot be read as {kind}" in msg


@pytest.mark.parametrize("name,content", [
    ("empty.jsonl", ""),
    ("blank.jsonl", "\n\n   \n"),
    ("empty.json", "[]"),
    ("header.csv", "prompt,response\n"),
])
def test_files_without_rows_are_refused(tmp_path, name, content):
    path = _write(tmp_path / name, content)
    msg = _raises(path)
    assert path in msg and ("no rows" in msg or "empty" in msg)


def test_parquet_without_rows_is_refused(tmp_path):
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    msg = _raises(str(path))
    assert "no rows" in msg
