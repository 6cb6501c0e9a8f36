"""The bundled quickstart data: reproducible byte for byte, well-formed, and its tokenizer loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from generated_data import assert_regenerates

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "quickstart"
SCRIPT = ROOT / "scripts" / "make_quickstart_data.py"
GENERATED = ["train.jsonl", "chat.jsonl", "text.jsonl",
             "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]


def _rows(name: str) -> list[dict]:
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(DATA / "tokenizer"))


def test_script_regenerates_the_committed_files_byte_for_byte(tmp_path):
    assert_regenerates(SCRIPT, DATA, GENERATED, tmp_path)


def test_instruction_rows(tok):
    rows = _rows("train.jsonl")
    assert 1400 <= len(rows) <= 1600
    assert all(set(r) == {"prompt", "response"} for r in rows)
    assert all(r["prompt"].endswith("\n") and r["response"].strip() for r in rows)
    lengths = [len(tok.encode(r["prompt"] + r["response"], add_special_tokens=False)) for r in rows]
    assert max(lengths) <= 40
    # Consistent facts: the same prompt never has two different answers.
    answers: dict[str, set[str]] = {}
    for r in rows:
        answers.setdefault(r["prompt"], set()).add(r["response"])
    assert all(len(a) == 1 for a in answers.values())
    for prompt, (response,) in answers.items():
        if prompt.startswith("Add "):
            a, b = prompt[4:-2].split(" and ")
            assert int(response) == int(a) + int(b)
        if prompt.startswith("Reverse the words: "):
            assert response.split() == prompt[19:].split()[::-1]


def test_chat_and_text_rows():
    chat = _rows("chat.jsonl")
    assert 40 <= len(chat) <= 60
    for row in chat:
        roles = [m["role"] for m in row["messages"]]
        assert roles[-1] == "assistant" and "user" in roles
        assert all(set(m) == {"role", "content"} and m["content"] for m in row["messages"])
    text = _rows("text.jsonl")
    assert 40 <= len(text) <= 60 and all(set(r) == {"text"} and r["text"] for r in text)


def test_tokenizer_loads_offline_with_the_agreed_specials(tok):
    assert len(tok) == 1024
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert [tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token] == [
        "<pad>", "<s>", "</s>", "<unk>"]
    assert tok.model_max_length == 512
    assert tok("plain text")["input_ids"][0] != tok.bos_token_id  # adds no specials itself


def test_tokenizer_round_trips_any_text(tok):
    for text in ["What color is a zib?\n", "héllo wörld — 日本語 🙂", "  two  spaces\t"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    texts = [r["prompt"] + r["response"] for r in _rows("train.jsonl")[:200]]
    assert all(3 not in tok.encode(t, add_special_tokens=False) for t in texts)


def test_chat_template(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<s><|user|>\nHi\n<|assistant|>\nHello</s>\n")
    assert tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) == (
        "<s><|user|>\nHi\n<|assistant|>\n")
