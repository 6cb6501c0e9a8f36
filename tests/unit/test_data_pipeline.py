"""build_datasets, pack, split_indices and collate: counts, splits, packing invariants, padding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from qtrain.config.schema import DataConfig
from qtrain.data import Example, build_datasets, collate, pack, split_indices
from qtrain.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = ROOT / "data" / "quickstart" / "tokenizer"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _numbered_rows(n: int) -> list[dict]:
    return [{"prompt": f"Row {i}:\n", "response": f"answer {i}"} for i in range(n)]


def _row_id(tok, example: Example) -> int:
    return int(tok.decode(example.input_ids).split("Row ")[1].split(":")[0])


def _full_len(tok, row: dict) -> int:
    """Length of an encoded instruction row: BOS + prompt + response + EOS."""
    pieces = (row["prompt"], row["response"])
    return 1 + sum(len(tok.encode(p, add_special_tokens=False)) for p in pieces) + 1


def _cfg(path: str, **kw) -> DataConfig:
    kw.setdefault("packing", False)
    kw.setdefault("eval_split", 0.0)
    kw.setdefault("max_len", 64)
    return DataConfig(path=path, **kw)


# Rows of increasing length; the last ones are long in the response, one is long in the prompt.
VARIED = ([{"prompt": "Q\n", "response": "word " * k} for k in (1, 3, 10, 25, 40)]
          + [{"prompt": "long " * 40 + "\n", "response": "ok"}])


@pytest.mark.parametrize("max_len", [12, 24, 40])
def test_truncate_cuts_and_counts(tmp_path, tok, max_len):
    path = _jsonl(tmp_path / "v.jsonl", VARIED)
    lengths = [_full_len(tok, r) for r in VARIED]
    overlong = sum(n > max_len for n in lengths)
    assert 0 < overlong < len(VARIED)  # the parametrization exercises both kinds

    bundle = build_datasets(_cfg(path, max_len=max_len, overlong="truncate"), tok, seed=0)
    r = bundle.report

    assert r.rows_read == len(VARIED)
    assert r.rows_truncated == overlong
    assert r.rows_dropped_overlong == 0
    # The long-prompt row is cut inside its prompt: nothing left to train, so it goes.
    assert r.rows_dropped_no_labels == 1
    assert len(bundle.train) == r.train_sequences == len(VARIED) - 1
    assert sorted(len(e) for e in bundle.train) == sorted(min(n, max_len) for n in lengths[:-1])


@pytest.mark.parametrize("max_len", [12, 24, 40])
def test_drop_removes_and_counts(tmp_path, tok, max_len):
    path = _jsonl(tmp_path / "v.jsonl", VARIED)
    lengths = [_full_len(tok, r) for r in VARIED]

    bundle = build_datasets(_cfg(path, max_len=max_len, overlong="drop"), tok, seed=0)
    r = bundle.report

    assert r.rows_dropped_overlong == sum(n > max_len for n in lengths)
    assert r.rows_truncated == 0 and r.rows_dropped_no_labels == 0
    assert sorted(len(e) for e in bundle.train) == sorted(n for n in lengths if n <= max_len)


def test_everything_dropped_explains_counts_and_fix(tmp_path, tok):
    rows = [{"prompt": "Q\n", "response": "word " * 30}] * 3
    path = _jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(DataError) as info:
        build_datasets(_cfg(path, max_len=10, overlong="drop"), tok, seed=0)
    msg = str(info.value)
    assert path in msg and "3 rows" in msg and "3 longer than data.max_len=10" in msg
    assert "data.overlong: truncate" in msg and "raise data.max_len" in msg


def test_everything_masked_after_truncation_explains(tmp_path, tok):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "long " * 40, "response": "ok"}] * 2)
    with pytest.raises(DataError) as info:
        build_datasets(_cfg(path, max_len=10), tok, seed=0)
    msg = str(info.value)
    assert "2 rows" in msg and "2 with no tokens left to train" in msg and "max_len" in msg


def test_report_counts_tokens(tmp_path, tok):
    path = _jsonl(tmp_path / "n.jsonl", _numbered_rows(30))
    bundle = build_datasets(_cfg(path, eval_split=0.2), tok, seed=3)
    r = bundle.report
    assert (r.train_sequences, r.eval_sequences) == (24, 6)
    assert r.train_tokens == sum(len(e.input_ids) for e in bundle.train)
    assert r.trained_tokens == sum(sum(1 for x in e.labels if x != -100) for e in bundle.train)
    # Per row the response and EOS are trained.
    expected = sum(len(tok.encode(f"answer {_row_id(tok, e)}", add_special_tokens=False)) + 1
                   for e in bundle.train)
    assert r.trained_tokens == expected
    line = r.summary_line()
    assert "\n" not in line and "30 rows" in line and "24 train" in line and "6 eval" in line


def test_eval_split_is_disjoint_complete_and_seeded(tmp_path, tok):
    path = _jsonl(tmp_path / "n.jsonl", _numbered_rows(40))

    def ids(seed):
        b = build_datasets(_cfg(path, eval_split=0.25), tok, seed=seed)
        return [_row_id(tok, e) for e in b.train], [_row_id(tok, e) for e in b.eval]

    train, held = ids(7)
    assert len(held) == 10 and not set(train) & set(held)
    assert sorted(train + held) == list(range(40))
    assert ids(7) == (train, held)
    assert any(sorted(ids(s)[1]) != sorted(held) for s in (8, 9, 10))


@pytest.mark.parametrize("n,fraction,n_eval", [(2, 0.01, 1), (1, 0.5, 0), (10, 0.0, 0),
                                                (10, 0.99, 9), (100, 0.05, 5)])
def test_split_sizes(n, fraction, n_eval):
    train, held = split_indices(n, fraction, seed=0)
    assert len(held) == n_eval
    assert sorted(train + held) == list(range(n))


def test_eval_path_is_used_whole_and_train_keeps_every_row(tmp_path, tok):
    train_path = _jsonl(tmp_path / "t.jsonl", _numbered_rows(5))
    eval_path = _jsonl(tmp_path / "e.jsonl", _numbered_rows(8)[5:])
    b = build_datasets(_cfg(train_path, eval_split=0.5, eval_path=eval_path), tok, seed=0)
    assert sorted(_row_id(tok, e) for e in b.train) == [0, 1, 2, 3, 4]
    assert sorted(_row_id(tok, e) for e in b.eval) == [5, 6, 7]
    assert b.report.rows_read == 8


def test_bad_row_error_uses_the_row_number_in_the_file(tmp_path, tok):
    rows = _numbered_rows(6)
    rows[4] = {"prompt": "x\n", "response": 17}
    path = _jsonl(tmp_path / "n.jsonl", rows)
    with pytest.raises(DataError) as info:
        build_datasets(_cfg(path, eval_split=0.5), tok, seed=1)
    msg = str(info.value)
    assert f"{path}, row 5" in msg and "'response'" in msg and "string" in msg


def test_bad_eval_file_row_names_the_eval_file(tmp_path, tok):
    train_path = _jsonl(tmp_path / "t.jsonl", _numbered_rows(3))
    eval_path = _jsonl(tmp_path / "e.jsonl", [{"prompt": "a\n", "response": "b"}, {"prompt": "c"}])
    with pytest.raises(DataError) as info:
        build_datasets(_cfg(train_path, eval_path=eval_path), tok, seed=0)
    assert f"{eval_path}, row 2" in str(info.value)


def test_unknown_field_rename_is_refused_before_reading(tmp_path, tok):
    with pytest.raises(DataError, match="data.fields.answer"):
        build_datasets(_cfg(str(tmp_path / "absent.jsonl"), fields={"answer": "x"}), tok, seed=0)


def _rows_of(example: Example) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The whole rows a (packed) example is made of, each with its first label masked."""
    out, start = [], 0
    for n in example.segment_lengths():
        ids, labels = example.input_ids[start:start + n], example.labels[start:start + n]
        out.append((tuple(ids), (-100, *labels[1:])))
        start += n
    return out


def test_packing_keeps_every_row_whole_and_every_trained_token(tmp_path, tok):
    path = _jsonl(tmp_path / "n.jsonl", _numbered_rows(50))
    plain = build_datasets(_cfg(path, max_len=32), tok, seed=0)
    packed = build_datasets(_cfg(path, max_len=32, packing=True), tok, seed=0)

    assert all(len(e.input_ids) == len(e.labels) == sum(e.segments) <= 32 for e in packed.train)
    assert packed.report.trained_tokens == plain.report.trained_tokens
    assert packed.report.train_tokens == plain.report.train_tokens
    # The same rows, each whole: packing only groups them.
    assert sorted(r for e in packed.train for r in _rows_of(e)) == sorted(r for e in plain.train for r in _rows_of(e))
    assert packed.report.train_sequences == len(packed.train) < plain.report.train_sequences
    # Best fit leaves no two sequences that would fit together in one.
    sizes = [len(e) for e in packed.train]
    assert all(a + b > 32 for i, a in enumerate(sizes) for b in sizes[i + 1:])


def _distinct(lengths: list[int], trained: list[int]) -> list[Example]:
    """Examples whose tokens name their example and position: 1000*k + j."""
    out = []
    for k, (n, t) in enumerate(zip(lengths, trained)):
        ids = [1000 * k + j for j in range(n)]
        out.append(Example(ids, [-100] * (n - t) + ids[n - t:]))
    return out


def test_pack_places_whole_examples_best_fit_decreasing():
    examples = _distinct([5, 9, 3, 12, 7, 4], [2, 9, 1, 6, 3, 4])
    bins = pack(examples, 16, seed=0)
    # Longest first, each into the bin it fills best: 12+4, 9+7, 5+3.
    members = [[ids[0] // 1000 for ids in (b.input_ids[s:] for s in _starts(b))] for b in bins]
    assert members == [[3, 5], [1, 4], [0, 2]]
    for b, ks in zip(bins, members):
        assert b.segments == tuple(len(examples[k].input_ids) for k in ks)
        assert b.input_ids == [t for k in ks for t in examples[k].input_ids]
        # Each row's first label is masked (nothing before it in its document predicts it).
        assert b.labels == [x for k in ks for x in [-100] + examples[k].labels[1:]]


def _starts(example: Example) -> list[int]:
    out, at = [], 0
    for n in example.segments:
        out.append(at)
        at += n
    return out


def test_pack_breaks_ties_by_seed():
    examples = _distinct([4] * 12, [2] * 12)
    first = pack(examples, 10, seed=0)
    assert pack(examples, 10, seed=0) == first
    assert any(pack(examples, 10, seed=s) != first for s in (1, 2, 3))
    assert sorted(len(b) for b in first) == [8] * 6  # two rows of 4 per bin of 10


def test_pack_refuses_an_example_longer_than_the_bins():
    with pytest.raises(ValueError, match="length 9"):
        pack(_distinct([9, 3], [1, 1]), 8, seed=0)


def test_chat_data_end_to_end(tok):
    cfg = DataConfig(path=str(ROOT / "data" / "quickstart" / "chat.jsonl"), format="chat",
                     max_len=128, packing=False, eval_split=0.1)
    b = build_datasets(cfg, tok, seed=0)
    assert b.report.rows_read == 50 and len(b.train) == 45 and len(b.eval) == 5
    for e in b.train:
        trained = tok.decode([t for t in e.labels if t != -100])
        assert "<|" not in trained and trained.endswith("</s>\n")


def test_collate_right_pads():
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_collate_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        collate([Example([1, 2], [1])], pad_id=0)


def test_a_path_list_or_glob_reads_its_files_in_order_as_one_source(tmp_path, tok):
    (tmp_path / "shards").mkdir()
    a = _jsonl(tmp_path / "shards" / "a.jsonl", _numbered_rows(3))
    b = _jsonl(tmp_path / "shards" / "b.jsonl", _numbered_rows(5)[3:])
    for path in ([a, b], str(tmp_path / "shards" / "*.jsonl")):
        bundle = build_datasets(_cfg(path), tok, seed=0)
        assert bundle.report.rows_read == 5
        assert [_row_id(tok, e) for e in bundle.train] == [0, 1, 2, 3, 4]
    _jsonl(tmp_path / "shards" / "b.jsonl", [{"prompt": "x\n", "response": "y"}, {"prompt": "z\n"}])
    with pytest.raises(DataError, match=f"{b}, row 2"):
        build_datasets(_cfg([a, b]), tok, seed=0)
    with pytest.raises(DataError, match="no file matches this pattern; check data.path"):
        build_datasets(_cfg(str(tmp_path / "none" / "*.jsonl")), tok, seed=0)
