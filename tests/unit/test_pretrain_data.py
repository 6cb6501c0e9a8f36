"""The bundled pretraining text of the methods lab: reproducible byte for byte, and disjoint from the
dialogue-summarization splits it is meant to prepare a base for."""

from __future__ import annotations

import json
from pathlib import Path

from generated_data import assert_regenerates

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "make_pretrain_text.py"


def test_script_regenerates_the_committed_file_byte_for_byte(tmp_path):
    assert_regenerates(SCRIPT, ROOT / "data" / "pretrain", ["text.jsonl"], tmp_path)


def test_no_dialogue_of_the_summarization_splits_and_no_summarization_prompt():
    texts = [json.loads(line)["text"] for line in (ROOT / "data/pretrain/text.jsonl").read_text().splitlines()]
    held_out = [json.loads(line)["dialogue"] for name in ("train.jsonl", "eval.jsonl")
                for line in (ROOT / "data/dialogsum" / name).read_text().splitlines()]
    corpus = "\n".join(texts)
    assert len(texts) == 4000 and not any(d in corpus for d in held_out)
    assert "Summarize" not in corpus
    paired = sum("\n\n" in t for t in texts)
    assert 0.5 < paired / len(texts) < 0.7  # dialogue + account; the rest stand alone
