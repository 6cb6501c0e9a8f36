"""Datasets from local files: read, encode per format with label masking, cache, pack, batch by rank."""

from qtrain.data.collate import collate
from qtrain.data.example import Example, Seq2SeqExample
from qtrain.data.formats import (
    FORMAT_FIELDS,
    IGNORE_INDEX,
    SEQ2SEQ_FORMATS,
    SUMMARIZATION_PROMPT,
    check_fields,
    encode_row,
    encode_rows,
    encode_seq2seq_row,
)
from qtrain.data.pipeline import (
    DataBundle,
    DataReport,
    build_datasets,
    data_cache_dir,
    default_num_proc,
    pack,
    split_indices,
)
from qtrain.data.read import read_rows, resolve_files
from qtrain.data.sampler import BatchStream, MapBatches, epoch_batches
from qtrain.data.split import held_out_rows

__all__ = [
    "FORMAT_FIELDS",
    "IGNORE_INDEX",
    "SEQ2SEQ_FORMATS",
    "SUMMARIZATION_PROMPT",
    "BatchStream",
    "DataBundle",
    "DataReport",
    "Example",
    "MapBatches",
    "Seq2SeqExample",
    "build_datasets",
    "check_fields",
    "collate",
    "data_cache_dir",
    "default_num_proc",
    "encode_row",
    "encode_rows",
    "encode_seq2seq_row",
    "epoch_batches",
    "held_out_rows",
    "pack",
    "read_rows",
    "resolve_files",
    "split_indices",
]
