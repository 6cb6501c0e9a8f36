"""A recipe's data section -> train/eval sequences: built once into a cache, memory-mapped after that.

`build_datasets` is the entry point. Map-style data is read, encoded, split, filtered, mixed and
packed into Arrow files (build.py) under a cache entry keyed by every input (cache.py); training
and eval read sequences from the memory-mapped files (store.py). Streaming data is encoded and
packed on the fly instead (stream.py). Either way the trainer asks the bundle for
`train_stream(...)`, an endless, resumable source of micro-batches of examples.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np

from qtrain.config.schema import DataConfig
from qtrain.data.build import DataReport, Plan, build, key_inputs, make_plan
from qtrain.data.cache import cache_key, open_or_build
from qtrain.data.example import Example, Seq2SeqExample
from qtrain.data.formats import check_fields, check_seq2seq_format
from qtrain.data.packing import pack
from qtrain.data.sampler import MapBatches
from qtrain.data.split import split_indices
from qtrain.data.store import SequenceSet, TokenRows, read_sequences
from qtrain.errors import ConfigError

__all__ = ["DataBundle", "DataReport", "Example", "Seq2SeqExample", "build_datasets", "check_seq2seq_inputs",
           "data_cache_dir", "default_num_proc", "pack", "split_indices"]


class ExampleStream(Protocol):
    """What the trainer iterates: micro-batches of examples, forever, with a resumable position."""

    def __next__(self) -> list[Example]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class DataBundle:
    """Train and eval data of a recipe. `train` is None when streaming (see `train_stream`)."""

    train: Optional[SequenceSet]
    eval: Sequence[Example]
    report: Any  # DataReport, or StreamReport when streaming (both have summary_line())
    # "built" or "cached" (with `cache_dir`, the entry), "temporary" without a cache, "streaming".
    cache_status: str = "temporary"
    cache_dir: Optional[Path] = None
    streamer: Any = None  # stream.StreamPlan when streaming
    # Batches are one padding-free row per micro-batch (see collate): decided once the model is
    # known (train.packing_check.configure_batches).
    flat: bool = False

    @property
    def packed(self) -> bool:
        """Sequences hold several whole rows (batches then carry per-row position ids)."""
        if self.streamer is not None:
            return self.streamer.plan.packing
        return bool(self.train is not None and self.train.packed)

    def train_stream(self, micro_batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> ExampleStream:
        """This rank's micro-batches of training examples (the global-micro-batch sharding of
        `sampler.epoch_batches`: N ranks x b equals one process x N*b)."""
        if self.streamer is not None:
            return self.streamer.batches(micro_batch_size, seed, rank, world_size)
        return MapBatches(self.train, micro_batch_size, seed, rank, world_size)

    def status_line(self) -> str:
        if self.cache_status in ("built", "cached"):
            return f"data: {self.cache_status} ({self.cache_dir})"
        return f"data: {self.cache_status}"

    def header(self, micro_batch_size: int, flat: bool) -> str:
        """The run header's data lines: cache, counts, and padding in batches of `micro_batch_size`."""
        lines = [self.report.summary_line()]
        if self.streamer is None:
            lines.insert(0, self.status_line())
        if self.train is not None and len(self.train):
            padded = 0.0 if flat else padding_fraction(self.train.lengths(), micro_batch_size)
            plain = padding_fraction(self.train.row_lengths(), micro_batch_size)
            self.report.padding, self.report.padding_unpacked = round(padded, 4), round(plain, 4)
            how = "padding-free (one row per micro-batch)" if flat else "padded to the longest sequence"
            lines.append(f"batches: {how}, {100 * padded:.1f}% padding (unpacked rows padded per "
                         f"micro-batch: {100 * plain:.1f}%)")
        return "\n".join(lines)


def padding_fraction(lengths: np.ndarray, micro_batch_size: int, seed: int = 0) -> float:
    """Share of positions that are padding when sequences of `lengths`, in a random order, are
    batched `micro_batch_size` at a time and padded to each batch's longest."""
    if lengths.size == 0:
        return 0.0
    order = np.random.default_rng(seed).permutation(lengths.size)
    shuffled = lengths[order].astype(np.int64)
    n_full = shuffled.size // micro_batch_size * micro_batch_size
    widths = shuffled[:n_full].reshape(-1, micro_batch_size).max(axis=1).sum() * micro_batch_size
    tail = shuffled[n_full:]
    if tail.size:
        widths += int(tail.max()) * tail.size
    return float(1.0 - shuffled.sum() / widths)


def data_cache_dir(cfg: DataConfig, output_dir: str) -> Path:
    """`data.cache_dir`, or `<output_dir>/data_cache`."""
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(output_dir) / "data_cache"


def default_num_proc(local_world_size: int = 1) -> int:
    """The CPU cores this process may use, shared among the ranks on its node (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))


def build_datasets(cfg: DataConfig, tokenizer: Any, seed: int, *, encoder_decoder: bool = False,
                   cache_dir: str | Path | None = None, progress: bool = False,
                   local_world_size: int = 1) -> DataBundle:
    """Read, split, encode, filter, mix and (optionally) pack the recipe's data.

    Args:
        cfg: the recipe's `data` section.
        tokenizer: a Hugging Face tokenizer.
        seed: the recipe seed; fixes the eval split, the mixture and the packing order.
        encoder_decoder: the model is an encoder-decoder (T5 family): rows become
            `Seq2SeqExample`s (see formats.encode_seq2seq_row); data.max_len bounds the encoder
            input and the labels alike.
        cache_dir: the cache directory (see `data_cache_dir`); None builds into a private
            temporary directory that lives as long as the bundle.
        progress: progress bars for the build stages.
        local_world_size: processes on this node, which share its cores when streaming (the
            default `data.num_proc`; a cache build has the cores to itself, the others wait).

    Raises:
        DataError: unreadable data, bad rows, a format the model cannot train on, or no
            training sequence left after filtering.
        ConfigError: data.packing with an encoder-decoder model.
    """
    check_fields(cfg.format, cfg.fields)
    if encoder_decoder:
        check_seq2seq_inputs(cfg)
    plan = make_plan(cfg, seed, encoder_decoder)
    if cfg.streaming:
        from qtrain.data.stream import streaming_bundle

        # Every rank encodes its stream at the same time: the node's cores are shared.
        num_proc = cfg.num_proc or default_num_proc(local_world_size)
        return streaming_bundle(cfg, plan, tokenizer, num_proc, cache_dir, progress)
    # One process builds while the node's other ranks wait on the cache lock: it takes every core it may use.
    num_proc = cfg.num_proc or default_num_proc()
    return open_built(plan, tokenizer, num_proc, cache_dir, rebuild=cfg.rebuild, progress=progress)


def open_built(plan: Plan, tokenizer: Any, num_proc: int, cache_dir: str | Path | None, *,
               rebuild: bool = False, progress: bool = False) -> DataBundle:
    """The bundle of `plan`'s map-style build: from the cache, or built into it first."""
    if cache_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="qtrain-data-")
        entry = Path(tmp.name)
        manifest = build(entry, plan, tokenizer, num_proc, progress)
        return _open(entry, manifest, keepalive=tmp)
    key = cache_key(key_inputs(plan, tokenizer))
    entry = Path(cache_dir) / key

    def waiting() -> None:
        if progress:
            print(f"data: waiting for another process to build {entry}", file=sys.stderr, flush=True)

    bundle, status = open_or_build(Path(cache_dir), key, lambda out: build(out, plan, tokenizer, num_proc, progress),
                                   _open, rebuild=rebuild, on_wait=waiting)
    bundle.cache_status, bundle.cache_dir = status, entry
    return bundle


def _open(entry: Path, manifest: dict[str, Any], keepalive: Any = None) -> DataBundle:
    rows = TokenRows([entry / name for name in manifest["token_files"]])
    packed, seq2seq = manifest["packing"], manifest["seq2seq"]
    train, held = (SequenceSet(rows, *read_sequences(entry / f"{name}.arrow"), packed=packed, seq2seq=seq2seq,
                               keepalive=keepalive) for name in ("train", "eval"))
    return DataBundle(train=train, eval=held, report=DataReport(**manifest["report"]))


def check_seq2seq_inputs(cfg: DataConfig) -> None:
    """Refuse data settings an encoder-decoder model cannot train with (format, packing)."""
    check_seq2seq_format(cfg.format)
    if cfg.packing:
        raise ConfigError("data.packing: an encoder-decoder model (T5 family) trains on one prompt -> answer pair "
                          "per sequence, and packing would glue rows together; set data.packing: false")
