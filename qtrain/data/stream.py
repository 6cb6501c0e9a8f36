"""Streaming data (`data.streaming: true`): rows read, encoded by a worker pool and packed while training runs.

The stream is cut into windows of WINDOW_ROWS rows. Window k's rows (drawn from the sources by
`mix.window_sources`, each source read in file order and started over at its end) are encoded,
filtered, packed and shuffled as a unit, and handed out as micro-batches with the same
global-micro-batch sharding as map-style data. Everything about window k is a pure function of
(data, settings, seed, k), so the position is just (window, micro-batches taken from it): a
resume re-reads up to the window's start, re-encodes that one window and continues exactly.
While window k trains, window k + 1 is read and its encoding runs in the pool.

Every rank reads and encodes the whole stream (tokenizing is cheap next to a training step)
and keeps its own slice, so no rank waits for another's data.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from qtrain.config.schema import DataConfig
from qtrain.data.build import Plan, Source, empty_training_error
from qtrain.data.encode import DROPPED, EncodeSpec, fit_row, serial_tokenizers_in_workers
from qtrain.data.example import Example, Seq2SeqExample, concat_rows
from qtrain.data.formats import encode_rows
from qtrain.data.mix import window_counts, window_sources
from qtrain.data.packing import best_fit_decreasing
from qtrain.data.read import stream_rows
from qtrain.data.sampler import epoch_batches
from qtrain.errors import DataError

WINDOW_ROWS = 2048
CHUNK_ROWS = 256  # rows per task sent to a worker
POOL_TIMEOUT_S = 300.0  # a window takes about a second to encode; far longer means a lost task

Item = tuple[str, int, dict[str, Any]]  # (file, 1-based row number in it, row)


@dataclass
class StreamReport:
    """What the run header says about streamed data (row counts are unknown up front)."""

    files: int
    eval_sequences: int
    packing: bool
    num_proc: int

    def summary_line(self) -> str:
        how = "encoded and packed" if self.packing else "encoded"
        return (f"data: streaming {self.files} file(s), {how} on the fly by {self.num_proc} worker(s) in windows "
                f"of {WINDOW_ROWS} rows; {self.eval_sequences} eval sequences")


@dataclass(frozen=True)
class StreamPlan:
    plan: Plan
    tokenizer: Any
    num_proc: int

    def batches(self, micro_batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> StreamBatches:
        return StreamBatches(self, micro_batch_size, seed, rank, world_size)


def streaming_bundle(cfg: DataConfig, plan: Plan, tokenizer: Any, num_proc: int, cache_dir: Any, progress: bool):
    """A DataBundle whose training data streams; eval (data.eval_path) is built map-style and cached."""
    from qtrain.data.pipeline import DataBundle, open_built

    evals: Any = []
    if plan.eval_source is not None:
        eval_plan = Plan((), plan.eval_source, plan.spec, plan.packing, 0.0, plan.seed, False)
        evals = open_built(eval_plan, tokenizer, num_proc, cache_dir, rebuild=cfg.rebuild, progress=progress).eval
    report = StreamReport(sum(len(s.files) for s in plan.sources), len(evals), plan.packing, num_proc)
    return DataBundle(train=None, eval=evals, report=report, cache_status="streaming",
                      streamer=StreamPlan(plan, tokenizer, num_proc))


class RowReader:
    """One source's rows in order, file after file, starting over after the last (a new pass)."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.passes = 0
        self._file, self._row = 0, 0
        self._rows: Iterator[dict[str, Any]] | None = None

    def take(self, n: int) -> list[Item]:
        return [self._next() for _ in range(n)]

    def skip(self, n: int) -> None:
        for _ in range(n):
            self._next()

    def _next(self) -> Item:
        while True:
            path = self.source.files[self._file]
            if self._rows is None:
                self._rows, self._row = stream_rows(path, self.source.key), 0
            row = next(self._rows, None)
            if row is not None:
                self._row += 1
                return path, self._row, row
            if self._row == 0:
                raise DataError(f"{path}: no rows in the file; point {self.source.key} at a file with data")
            self._rows, self._file = None, (self._file + 1) % len(self.source.files)
            self.passes += self._file == 0


class StreamBatches:
    """This rank's micro-batches of the stream, forever; `state_dict()` is (window, position)."""

    def __init__(self, sp: StreamPlan, micro_batch_size: int, seed: int, rank: int, world_size: int) -> None:
        self.sp, self.micro_batch_size, self.seed = sp, micro_batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.window, self.position = 0, 0
        self._batches: list[list[Example]] | None = None
        self._readers: list[RowReader] | None = None
        self._readers_at = -1           # the window whose first row the readers will read next
        self._pending: tuple[int, Any, list[Item]] | None = None
        self._pool: Any = None
        self._kept_ever = 0

    def __iter__(self) -> StreamBatches:
        return self

    def __next__(self) -> list[Example]:
        if self._batches is None:
            self._batches = self._window_batches(self.window)
        while self.position >= len(self._batches):
            self.window, self.position = self.window + 1, 0
            self._batches = self._window_batches(self.window)
        self.position += 1
        return self._batches[self.position - 1]

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "stream", "window": self.window, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (saved by a stream over the same data and settings).

        Raises:
            DataError: the state was saved for map-style data.
        """
        if state.get("kind") != "stream":
            raise DataError("cannot resume the data order: the checkpoint was saved with map-style data and this "
                            "run streams (data.streaming: true); resume with the same data settings, or start "
                            "a new run")
        self.window, self.position = int(state["window"]), int(state["position"])
        self._batches, self._pending = None, None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    def _window_batches(self, k: int) -> list[list[Example]]:
        encoded, items = self._encoded(k)
        self._submit(k + 1)  # read ahead and encode the next window while this one trains
        sequences = self._sequences(k, encoded, items)
        if len(sequences) < self.world_size:
            return []
        batches = epoch_batches(len(sequences), self.micro_batch_size, self.seed, f"stream-{k}",
                                self.rank, self.world_size)
        return [[sequences[i] for i in b] for b in batches]

    def _encoded(self, k: int) -> tuple[list[tuple[int, list[int], list[int]]], list[Item]]:
        if self._pending is None or self._pending[0] != k:
            self._submit(k)
        _, handle, items = self._pending
        self._pending = None
        chunks = handle if isinstance(handle, list) else self._collect(handle, items)
        return [row for chunk in chunks for row in chunk], items

    def _collect(self, handle: Any, items: list[Item]) -> list[list[tuple[int, list[int], list[int]]]]:
        """The pool's result; if it never comes (a worker was killed: the OOM killer, a signal to
        the process group), the window is encoded here instead -- the same rows, the same result."""
        try:
            return handle.get(timeout=POOL_TIMEOUT_S)
        except multiprocessing.TimeoutError:
            self.close()
            return [encode_items(items, self.sp.plan.spec, self.sp.tokenizer)]

    def _submit(self, k: int) -> None:
        items = self._read_window(k)
        chunks = [items[i:i + CHUNK_ROWS] for i in range(0, len(items), CHUNK_ROWS)]
        pool = self._worker_pool()
        if pool is None:
            handle: Any = [encode_items(c, self.sp.plan.spec, self.sp.tokenizer) for c in chunks]
        else:
            handle = pool.map_async(_encode_in_worker, chunks)
        self._pending = (k, handle, items)

    def _read_window(self, k: int) -> list[Item]:
        sources = self.sp.plan.sources
        if self._readers is None or self._readers_at != k:
            self._readers = [RowReader(s) for s in sources]
            for reader, at in zip(self._readers, self._cursors(k)):
                reader.skip(int(at))
        if len(sources) == 1:
            items = self._readers[0].take(WINDOW_ROWS)
        else:
            order = window_sources([s.weight for s in sources], WINDOW_ROWS, self.seed, k)
            taken = [iter(r.take(int((order == i).sum()))) for i, r in enumerate(self._readers)]
            items = [next(taken[i]) for i in order.tolist()]
        self._readers_at = k + 1
        return items

    def _cursors(self, k: int) -> np.ndarray:
        """Rows each source has given before window k."""
        sources = self.sp.plan.sources
        if len(sources) == 1:
            return np.array([k * WINDOW_ROWS])
        weights = [s.weight for s in sources]
        return sum((window_counts(weights, WINDOW_ROWS, self.seed, j) for j in range(k)),
                   np.zeros(len(sources), dtype=np.int64))

    def _sequences(self, k: int, encoded: list[tuple[int, list[int], list[int]]], items: list[Item]) -> list[Example]:
        plan = self.sp.plan
        kept = [(ids, labels) for status, ids, labels in encoded if not status & DROPPED]
        self._kept_ever += len(kept)
        if not kept and self._kept_ever == 0 and all(r.passes for r in self._readers or []):
            statuses = np.array([status for status, _, _ in encoded])
            raise empty_training_error(plan.sources[0], plan.spec, statuses)
        if not plan.packing:
            make = Seq2SeqExample if plan.spec.encoder_decoder else Example
            sequences = [make(ids, labels) for ids, labels in kept]
        else:
            lengths = np.array([len(ids) for ids, _ in kept], dtype=np.int64)
            offsets, members = best_fit_decreasing(lengths, plan.spec.max_len, f"{self.seed}:stream:{k}")
            sequences = [concat_rows([kept[i] for i in members[a:b].tolist()])
                         for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
        return sequences

    def _worker_pool(self) -> Any:
        if self.sp.num_proc <= 1:
            return None
        if self._pool is None:
            # fork: workers inherit the tokenizer instead of unpickling it; created from the
            # main thread before any helper thread exists.
            with serial_tokenizers_in_workers():
                self._pool = multiprocessing.get_context("fork").Pool(
                    self.sp.num_proc, initializer=_init_worker, initargs=(self.sp.plan.spec, self.sp.tokenizer))
        return self._pool


def encode_items(items: list[Item], spec: EncodeSpec, tokenizer: Any) -> list[tuple[int, list[int], list[int]]]:
    """(status, ids, labels) of each item, one `encode_rows` call per run of rows from the same file."""
    out: list[tuple[int, list[int], list[int]]] = []
    start = 0
    while start < len(items):
        end = start
        while end < len(items) and items[end][0] == items[start][0]:
            end += 1
        run = items[start:end]
        encoded = encode_rows([row for _, _, row in run], spec.format, tokenizer, spec.fields, source=run[0][0],
                              row_numbers=[n for _, n, _ in run], encoder_decoder=spec.encoder_decoder)
        out.extend(fit_row(ids, labels, spec) for ids, labels in encoded)
        start = end
    return out


_WORKER: dict[str, Any] = {}  # set in each pool process by _init_worker


def _init_worker(spec: EncodeSpec, tokenizer: Any) -> None:
    # A forked worker inherits the trainer's preemption handlers, which only set a flag: it would
    # then outlive Pool.terminate() (SIGTERM) blocked on the task queue's lock. Workers die on
    # SIGTERM/SIGUSR1 and leave Ctrl-C to the trainer.
    for name in ("SIGTERM", "SIGUSR1"):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER.update(spec=spec, tokenizer=tokenizer)


def _encode_in_worker(items: list[Item]) -> list[tuple[int, list[int], list[int]]]:
    return encode_items(items, _WORKER["spec"], _WORKER["tokenizer"])
