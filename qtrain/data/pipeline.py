"""A recipe's data section -> tokenized train/eval sequences: read, split, encode, filter, pack."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qtrain.config.schema import DataConfig
from qtrain.data.formats import IGNORE_INDEX, check_fields, check_seq2seq_format, encode_row, encode_seq2seq_row
from qtrain.data.read import read_rows
from qtrain.errors import ConfigError, DataError


@dataclass
class Example:
    """One training sequence; `labels` is -100 where no loss is taken."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class Seq2SeqExample(Example):
    """One encoder-decoder training pair: `input_ids` is the encoder's input, `labels` the decoder's
    target (its own length; the decoder reads it shifted right). Its length is the encoder's."""


@dataclass
class DataReport:
    """What happened to the rows on the way to sequences. Row counts cover train and eval."""

    rows_read: int = 0
    rows_dropped_overlong: int = 0
    rows_truncated: int = 0
    rows_dropped_no_labels: int = 0
    train_sequences: int = 0
    eval_sequences: int = 0
    train_tokens: int = 0
    trained_tokens: int = 0

    def summary_line(self) -> str:
        """One line for the CLI, e.g. `data: 1500 rows -> 310 train / 16 eval sequences; ...`."""
        dropped = self.rows_dropped_overlong + self.rows_dropped_no_labels
        return (f"data: {self.rows_read} rows -> {self.train_sequences} train / "
                f"{self.eval_sequences} eval sequences; {self.train_tokens} train tokens, "
                f"{self.trained_tokens} trained; {self.rows_truncated} truncated, "
                f"{dropped} dropped "
                f"({self.rows_dropped_overlong} too long, {self.rows_dropped_no_labels} "
                f"with nothing to train)")


@dataclass
class DataBundle:
    train: list[Example]
    eval: list[Example]
    report: DataReport


@dataclass
class _Rows:
    """Rows of one file, each with its 1-based row number there (kept for error messages)."""

    source: str
    rows: list[tuple[int, dict[str, Any]]] = field(default_factory=list)


@dataclass
class _Counts:
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_labels: int = 0


def build_datasets(cfg: DataConfig, tokenizer: Any, seed: int, *, encoder_decoder: bool = False) -> DataBundle:
    """Read, split, encode, filter and (optionally) pack the recipe's data.

    Args:
        cfg: the recipe's `data` section.
        tokenizer: a Hugging Face tokenizer.
        seed: the recipe seed; fixes the eval split and the packing order.
        encoder_decoder: the model is an encoder-decoder (T5 family): rows become
            `Seq2SeqExample`s (see formats.encode_seq2seq_row); data.max_len bounds the encoder
            input and the labels alike.

    Raises:
        DataError: unreadable data, bad rows, a format the model cannot train on, or no
            training sequence left after filtering.
        ConfigError: data.packing with an encoder-decoder model.
    """
    check_fields(cfg.format, cfg.fields)
    if encoder_decoder:
        check_seq2seq_inputs(cfg)
    if not cfg.path:
        raise DataError("data.path: not set; point it at a .jsonl/.json/.csv/.parquet file")
    train_rows, eval_rows, rows_read = _read_and_split(cfg, seed)

    train, train_counts = _encode_all(train_rows, cfg, tokenizer, encoder_decoder)
    evals, eval_counts = _encode_all(eval_rows, cfg, tokenizer, encoder_decoder)
    if not train:
        raise _empty_training_error(cfg, len(train_rows.rows), train_counts)
    if cfg.packing:
        train = pack(train, cfg.max_len, random.Random(f"{seed}:pack-train"))
        evals = pack(evals, cfg.max_len, random.Random(f"{seed}:pack-eval"))

    report = DataReport(
        rows_read=rows_read,
        rows_dropped_overlong=train_counts.dropped_overlong + eval_counts.dropped_overlong,
        rows_truncated=train_counts.truncated + eval_counts.truncated,
        rows_dropped_no_labels=train_counts.dropped_no_labels + eval_counts.dropped_no_labels,
        train_sequences=len(train),
        eval_sequences=len(evals),
        train_tokens=sum(len(e) for e in train),
        trained_tokens=sum(e.trained_tokens for e in train),
    )
    return DataBundle(train=train, eval=evals, report=report)


def check_seq2seq_inputs(cfg: DataConfig) -> None:
    """Refuse data settings an encoder-decoder model cannot train with (format, packing)."""
    check_seq2seq_format(cfg.format)
    if cfg.packing:
        raise ConfigError("data.packing: an encoder-decoder model (T5 family) trains on one prompt -> answer pair "
                          "per sequence, and packing would glue rows together; set data.packing: false")


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Hold out `fraction` of range(n) for eval, chosen by `seed`; both lists in file order.

    With fraction > 0 and n >= 2, eval gets at least one row and train keeps at least one.
    """
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    n_eval = min(n - 1, max(1, round(n * fraction)))
    held_out = set(random.Random(f"{seed}:eval-split").sample(range(n), n_eval))
    train = [i for i in range(n) if i not in held_out]
    return train, sorted(held_out)


def pack(examples: Sequence[Example], max_len: int, rng: random.Random) -> list[Example]:
    """Concatenate examples (in an order shuffled by `rng`) and cut into max_len blocks.

    Every block is exactly max_len tokens except possibly the last. A block with no trained
    label (all -100) is left out: it would add compute and no loss.
    """
    order = list(range(len(examples)))
    rng.shuffle(order)
    ids = [t for i in order for t in examples[i].input_ids]
    labels = [t for i in order for t in examples[i].labels]
    starts = range(0, len(ids), max_len)
    blocks = (Example(ids[s:s + max_len], labels[s:s + max_len]) for s in starts)
    return [b for b in blocks if b.trained_tokens > 0]


def _read_and_split(cfg: DataConfig, seed: int) -> tuple[_Rows, _Rows, int]:
    main = _read(cfg.path, "data.path")
    if cfg.eval_path:
        held = _read(cfg.eval_path, "data.eval_path")
        return main, held, len(main.rows) + len(held.rows)
    train_idx, eval_idx = split_indices(len(main.rows), cfg.eval_split, seed)
    train = _Rows(cfg.path, [main.rows[i] for i in train_idx])
    held = _Rows(cfg.path, [main.rows[i] for i in eval_idx])
    return train, held, len(main.rows)


def _read(path: str, key: str) -> _Rows:
    dataset = read_rows(path, key=key)
    try:
        rows = dataset.to_list()  # strings are decoded here, lazily, not when the file is read
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 text ({exc.reason} at byte {exc.start} of a value); "
                        f"re-save the file as UTF-8 or fix the bad rows ({key})") from None
    return _Rows(path, list(enumerate(rows, start=1)))


def _encode_all(rows: _Rows, cfg: DataConfig, tokenizer: Any,
                encoder_decoder: bool = False) -> tuple[list[Example], _Counts]:
    counts = _Counts()
    out = []
    encode, make = (encode_seq2seq_row, Seq2SeqExample) if encoder_decoder else (encode_row, Example)
    for number, row in rows.rows:
        ids, labels = encode(row, cfg.format, tokenizer, cfg.fields, source=rows.source, row_number=number)
        if max(len(ids), len(labels)) > cfg.max_len:
            if cfg.overlong == "drop":
                counts.dropped_overlong += 1
                continue
            ids, labels = ids[:cfg.max_len], labels[:cfg.max_len]
            counts.truncated += 1
        example = make(ids, labels)
        if example.trained_tokens == 0:
            counts.dropped_no_labels += 1
            continue
        out.append(example)
    return out, counts


def _empty_training_error(cfg: DataConfig, n_rows: int, counts: _Counts) -> DataError:
    reasons = []
    fixes = []
    if counts.dropped_overlong:
        reasons.append(f"{counts.dropped_overlong} longer than data.max_len={cfg.max_len} "
                       "(data.overlong: drop)")
        fixes.append("raise data.max_len or set data.overlong: truncate")
    if counts.dropped_no_labels:
        trunc = " after truncation to data.max_len" if counts.truncated else ""
        reasons.append(f"{counts.dropped_no_labels} with no tokens left to train{trunc}")
        fixes.append("raise data.max_len so responses fit" if counts.truncated
                     else "make sure rows have a response / assistant turn")
    why = "; ".join(reasons) or "none"
    return DataError(f"{cfg.path}: no training sequences left: {n_rows} rows read for training, "
                     f"all dropped ({why}); {' or '.join(fixes) or 'add rows'}")
