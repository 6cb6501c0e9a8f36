"""The bundled dialogue-summarization data: reproducible byte for byte, and every reference
summary states the dialogue's final facts (who, what, when, where)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from generated_data import assert_regenerates

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "dialogsum"
SCRIPT = ROOT / "scripts" / "make_dialogsum_data.py"
GENERATED = ["train.jsonl", "eval.jsonl",
             "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]


def _rows(name: str) -> list[dict]:
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _mentions(text: str, value: str) -> bool:
    """`value` occurs in `text` as whole words ("1 pm" is not found in "11 pm")."""
    return re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text) is not None


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("make_dialogsum_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def examples(gen):
    """(row, slots) for every committed row, train then eval, from the generator itself."""
    train, evaluation = gen.generate()
    assert [row for row, _ in train] == _rows("train.jsonl")
    assert [row for row, _ in evaluation] == _rows("eval.jsonl")
    return train + evaluation


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(DATA / "tokenizer"))


def test_script_regenerates_the_committed_files_byte_for_byte(tmp_path):
    assert_regenerates(SCRIPT, DATA, GENERATED, tmp_path)


def test_row_counts_fields_and_disjoint_splits():
    train, evaluation = _rows("train.jsonl"), _rows("eval.jsonl")
    assert (len(train), len(evaluation)) == (3000, 200)
    rows = train + evaluation
    assert all(set(r) == {"dialogue", "summary"} for r in rows)
    assert all(r["dialogue"].strip() and r["summary"].strip() for r in rows)
    train_dialogues = {r["dialogue"] for r in train}
    assert len(train_dialogues) == len(train)
    assert not train_dialogues & {r["dialogue"] for r in evaluation}


def test_dialogues_are_two_speakers_taking_turns(examples):
    for row, slots in examples:
        speakers = [line.split(": ", 1)[0] for line in row["dialogue"].split("\n")]
        assert set(speakers) == {slots.a, slots.b}, row["dialogue"]
        assert speakers[0] == slots.a


def test_summaries_state_the_final_who_what_when_where(examples):
    for row, slots in examples:
        summary, dialogue = row["summary"], row["dialogue"]
        for value in (slots.a, slots.b, slots.what, slots.day, slots.time, slots.place):
            assert _mentions(summary, value), (value, summary)
            assert _mentions(dialogue, value), (value, dialogue)


def test_change_of_plan_summaries_hold_the_new_value_not_the_old(examples):
    changed = [(row, slots) for row, slots in examples if slots.changed]
    assert 0.25 <= len(changed) / len(examples) <= 0.45
    assert set(Counter(slots.changed for _, slots in changed)) == {"time", "day", "place"}
    for row, slots in changed:
        new = getattr(slots, slots.changed)
        assert new != slots.old
        assert _mentions(row["summary"], new) and not _mentions(row["summary"], slots.old)
        # The dialogue first agrees on the old value and later switches to the new one.
        dialogue = row["dialogue"]
        assert dialogue.index(slots.old) < dialogue.rindex(new), dialogue


def test_every_scenario_has_an_equal_share(gen, examples):
    counts = Counter(slots.scenario for _, slots in examples)
    assert set(counts) == {sc.name for sc in gen.SCENARIOS}
    assert max(counts.values()) - min(counts.values()) <= 1


def test_tokenizer_special_tokens_and_config(tok):
    assert 1000 <= len(tok) <= 1024
    assert [tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id] == [0, 1, 2, 3]
    assert [tok.pad_token, tok.eos_token, tok.unk_token, tok.bos_token] == [
        "<pad>", "</s>", "<unk>", "<s>"]
    assert tok.model_max_length == 512
    text = "Anna: Hi Tom!"
    assert tok(text)["input_ids"] == tok.encode(text, add_special_tokens=False)  # adds no specials


def test_rows_round_trip_and_fit_the_length_budget(tok):
    rows = _rows("train.jsonl") + _rows("eval.jsonl")
    row = rows[0]
    for text in (row["dialogue"], row["summary"], "héllo — 日本語 🙂\n"):
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    dialogues = tok([r["dialogue"] for r in rows], add_special_tokens=False)["input_ids"]
    summaries = tok([r["summary"] for r in rows], add_special_tokens=False)["input_ids"]
    assert all(2 not in ids for ids in dialogues + summaries)  # no <unk>
    assert 40 <= min(map(len, dialogues)) and max(map(len, dialogues)) <= 115
    assert 10 <= min(map(len, summaries)) and max(map(len, summaries)) <= 30
