"""encode_row: exact label masks per format, field renames, and errors naming file/row/field."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from qtrain.data.formats import encode_row
from qtrain.errors import DataError

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "data" / "quickstart" / "tokenizer"
BOS, EOS = 1, 2  # the quickstart tokenizer's <s> and </s>


def _load_tokenizer():
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def tok():
    return _load_tokenizer()


def _enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _trained(ids: list[int], labels: list[int]) -> list[int]:
    assert len(ids) == len(labels)
    kept = [label for label in labels if label != -100]
    # Wherever a label is kept it must equal the input token at that position.
    assert all(label == token for token, label in zip(ids, labels) if label != -100)
    return kept


def _error(row, fmt, tok, fields=None, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        encode_row(row, fmt, tok, fields or {}, **kwargs)
    return str(info.value)


def test_instruction_masks_bos_and_prompt_and_trains_response_and_eos(tok):
    prompt, response = "Add 23 and 45.\n", "68"
    ids, labels = encode_row({"prompt": prompt, "response": response}, "instruction", tok, {})

    n_prompt = 1 + len(_enc(tok, prompt))
    assert ids == [BOS] + _enc(tok, prompt) + _enc(tok, response) + [EOS]
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(_trained(ids, labels)) == "68</s>"


def test_instruction_without_bos_token_prepends_nothing(tok):
    no_bos = _load_tokenizer()
    no_bos.bos_token = None
    assert no_bos.bos_token_id is None
    ids, labels = encode_row({"prompt": "Hi\n", "response": "yo"}, "instruction", no_bos, {})
    assert ids == _enc(tok, "Hi\n") + _enc(tok, "yo") + [EOS]
    assert labels.count(-100) == len(_enc(tok, "Hi\n"))


def test_text_trains_everything_but_bos(tok):
    text = "The blorp is green."
    ids, labels = encode_row({"text": text}, "text", tok, {})
    assert ids == [BOS] + _enc(tok, text) + [EOS]
    assert labels == [-100] + ids[1:]


def test_summarization_masks_the_fixed_prompt(tok):
    dialogue, summary = "A: hi\nB: hello", "They greet."
    ids, labels = encode_row({"dialogue": dialogue, "summary": summary}, "summarization", tok, {})
    n_masked = labels.count(-100)
    assert tok.decode(ids[:n_masked]) == (
        "<s>Summarize the following conversation.\n\nA: hi\nB: hello\n\nSummary: ")
    assert labels[:n_masked] == [-100] * n_masked
    assert tok.decode(_trained(ids, labels)) == "They greet.</s>"


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What color is a zib?"},
    {"role": "assistant", "content": "A zib is blue."},
    {"role": "user", "content": "Spell out 7."},
    {"role": "assistant", "content": "seven"},
]


def _runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) spans of consecutive trained positions."""
    spans, start = [], None
    for i, label in enumerate(labels + [-100]):
        if label != -100 and start is None:
            start = i
        elif label == -100 and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_chat_trains_exactly_the_assistant_turns(tok):
    ids, labels = encode_row({"messages": CONVERSATION}, "chat", tok, {})

    assert tok.decode(ids) == ("<s><|system|>\nBe brief.\n<|user|>\nWhat color is a zib?\n"
                               "<|assistant|>\nA zib is blue.</s>\n<|user|>\nSpell out 7.\n"
                               "<|assistant|>\nseven</s>\n")
    spans = _runs(labels)
    assert [tok.decode(ids[a:b]) for a, b in spans] == ["A zib is blue.</s>\n", "seven</s>\n"]
    assert labels[spans[0][0]:spans[0][1]] == ids[spans[0][0]:spans[0][1]]
    # Each trained span starts right after an assistant header, which stays masked.
    for start, _ in spans:
        assert tok.decode(ids[:start]).endswith("<|assistant|>\n")


def test_chat_without_assistant_turn_trains_nothing(tok):
    ids, labels = encode_row({"messages": CONVERSATION[:2]}, "chat", tok, {})
    assert ids and labels == [-100] * len(ids)


def test_chat_without_template_says_how_to_fix(tok):
    plain = _load_tokenizer()
    plain.chat_template = None
    msg = _error({"messages": CONVERSATION}, "chat", plain, source="c.jsonl", row_number=1)
    assert "chat template" in msg and "instruction" in msg and "c.jsonl" in msg


def test_chat_template_that_rewrites_history_is_refused(tok):
    unstable = _load_tokenizer()
    unstable.chat_template = ("{{ messages | length }}{% for m in messages %}"
                              "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    msg = _error({"messages": CONVERSATION}, "chat", unstable, source="c.jsonl", row_number=4)
    assert "c.jsonl, row 4" in msg and "chat template" in msg


def test_chat_template_whose_generation_prompt_differs_trains_the_whole_reply(tok):
    odd = _load_tokenizer()
    odd.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    ids, labels = encode_row({"messages": CONVERSATION[1:3]}, "chat", odd, {})
    assert tok.decode(ids) == "[user]What color is a zib?\n[assistant]A zib is blue.\n"
    assert [tok.decode(ids[a:b]) for a, b in _runs(labels)] == ["[assistant]A zib is blue.\n"]


@pytest.mark.parametrize("messages,problem", [
    ("hello", "must be a list"),
    ([], "empty list"),
    (["hi"], "message 1"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant"}], "message 2"),
])
def test_malformed_messages_are_refused(tok, messages, problem):
    msg = _error({"messages": messages}, "chat", tok, source="c.jsonl", row_number=9)
    assert "c.jsonl, row 9" in msg and "'messages'" in msg and problem in msg


def test_renamed_fields_read_other_columns(tok):
    default = encode_row({"prompt": "Hi\n", "response": "yo"}, "instruction", tok, {})
    renamed = encode_row({"instruction": "Hi\n", "output": "yo", "prompt": "ignored"},
                         "instruction", tok, {"prompt": "instruction", "response": "output"})
    assert renamed == default
    msgs = encode_row({"conv": CONVERSATION}, "chat", tok, {"messages": "conv"})
    assert msgs == encode_row({"messages": CONVERSATION}, "chat", tok, {})


def test_missing_column_names_file_row_field_and_fix(tok):
    msg = _error({"question": "Hi", "response": "yo"}, "instruction", tok,
                 source="train.jsonl", row_number=7)
    assert "train.jsonl, row 7" in msg and "'prompt'" in msg
    assert "set data.fields.prompt to the column that holds the prompt" in msg
    assert "question" in msg  # the columns that are there


def test_missing_renamed_column_names_the_rename(tok):
    msg = _error({"prompt": "Hi", "response": "yo"}, "instruction", tok,
                 {"prompt": "instruction"}, source="t.csv", row_number=2)
    assert "t.csv, row 2" in msg and "'instruction'" in msg and "data.fields.prompt" in msg


@pytest.mark.parametrize("value,problem", [
    (None, "has no value"),
    (42, "must be a string, got int"),
    (["a"], "must be a string, got list"),
    ("", "is empty"),
    ("   \n", "is empty"),
])
def test_bad_values_name_row_and_field(tok, value, problem):
    msg = _error({"prompt": "Hi", "response": value}, "instruction", tok,
                 source="train.jsonl", row_number=12)
    assert "train.jsonl, row 12" in msg and "'response'" in msg and problem in msg


def test_bad_text_and_summary_values(tok):
    assert "'text'" in _error({"text": 3}, "text", tok)
    assert "'dialogue'" in _error({"summary": "s"}, "summarization", tok)


def test_rename_of_unknown_field_is_refused(tok):
    msg = _error({"prompt": "a", "response": "b"}, "instruction", tok, {"promt": "q"})
    assert "data.fields.promt" in msg and "prompt, response" in msg


def test_unknown_format_is_refused(tok):
    assert "data.format" in _error({"text": "a"}, "poetry", tok)


def test_tokenizer_without_eos_is_refused(tok):
    no_eos = _load_tokenizer()
    no_eos.eos_token = None
    msg = _error({"text": "a"}, "text", no_eos, source="x.jsonl", row_number=1)
    assert "eos_token" in msg
