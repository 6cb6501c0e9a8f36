"""The eval split's prompts and reference answers, for generation metrics (ROUGE).

The split is the one `qtrain.data.build_datasets` holds out (`qtrain.data.held_out_rows`: same
files, same `split_indices`, same seed, or `data.eval_path`), and each prompt is encoded by the
format's own encoder, so the model sees exactly the prompt it was trained to continue (for an
encoder-decoder model: exactly the encoder input it was trained on, cut to data.max_len as
training cut it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qtrain.config.schema import DataConfig
from qtrain.data import IGNORE_INDEX, encode_row, encode_seq2seq_row, held_out_rows

# Formats whose rows carry one reference answer, and the field that holds it.
ANSWER_FIELD = {"instruction": "response", "summarization": "summary"}


@dataclass
class Reference:
    row: int                 # 1-based row number in its file
    prompt_ids: list[int]
    reference: str


@dataclass
class References:
    rows: list[Reference]
    # Prompts that fill data.max_len, leaving no room to answer (encoder-decoder: rows longer than
    # data.max_len under data.overlong: drop, which training leaves out too).
    skipped_long_prompts: int


def references(cfg: DataConfig, tokenizer, seed: int, encoder_decoder: bool = False) -> References:
    """Prompts + reference answers of the eval split; empty for formats without a single answer."""
    answer = ANSWER_FIELD.get(cfg.format)
    if answer is None:
        return References([], 0)
    rows = held_out_rows(cfg, seed)
    if encoder_decoder:
        return _encoder_references(cfg, tokenizer, rows, answer)
    out, skipped = [], 0
    for source, number, row in rows:
        ids, labels = encode_row(row, cfg.format, tokenizer, cfg.fields, source=source, row_number=number)
        n_prompt = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
        if n_prompt >= cfg.max_len:
            skipped += 1
            continue
        out.append(Reference(number, ids[:n_prompt], row[cfg.fields.get(answer, answer)]))
    return References(out, skipped)


def _encoder_references(cfg: DataConfig, tokenizer, rows: list[tuple[str, int, dict[str, Any]]],
                        answer: str) -> References:
    """Encoder inputs + reference answers for an encoder-decoder model."""
    out, skipped = [], 0
    for source, number, row in rows:
        ids, labels = encode_seq2seq_row(row, cfg.format, tokenizer, cfg.fields, source=source, row_number=number)
        if max(len(ids), len(labels)) > cfg.max_len and cfg.overlong == "drop":
            skipped += 1
            continue
        out.append(Reference(number, ids[:cfg.max_len], row[cfg.fields.get(answer, answer)]))
    return References(out, skipped)
