"""Datasets from local files: read, encode per format with label masking, pack, batch by rank."""

from qtrain.data.collate import collate
from qtrain.data.formats import (
    FORMAT_FIELDS,
    IGNORE_INDEX,
    SEQ2SEQ_FORMATS,
    SUMMARIZATION_PROMPT,
    check_fields,
    encode_row,
    encode_seq2seq_row,
)
from qtrain.data.pipeline import (
    DataBundle,
    DataReport,
    Example,
    Seq2SeqExample,
    build_datasets,
    pack,
    split_indices,
)
from qtrain.data.read import read_rows
from qtrain.data.sampler import BatchStream, epoch_batches

__all__ = [
    "FORMAT_FIELDS",
    "IGNORE_INDEX",
    "SEQ2SEQ_FORMATS",
    "SUMMARIZATION_PROMPT",
    "BatchStream",
    "DataBundle",
    "DataReport",
    "Example",
    "Seq2SeqExample",
    "build_datasets",
    "check_fields",
    "collate",
    "encode_row",
    "encode_seq2seq_row",
    "epoch_batches",
    "pack",
    "read_rows",
    "split_indices",
]
