"""The map-style build: files -> encoded rows -> eval split, filter, mixture, packing -> index files.

Everything lands in one directory (a cache entry, see cache.py): `tokens-*.arrow` (every row of
every file, encoded; dropped rows empty), `train.arrow` and `eval.arrow` (sequences as lists of
row ids). Packing and mixing only write row ids: no token is copied after encoding.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qtrain.config.schema import DataConfig
from qtrain.data.cache import file_digest, tokenizer_digest
from qtrain.data.encode import DROPPED, DROPPED_NO_LABELS, DROPPED_OVERLONG, TRUNCATED, EncodeSpec, encode_dataset
from qtrain.data.mix import mixture_rows
from qtrain.data.packing import best_fit_decreasing
from qtrain.data.read import check_file, read_rows, resolve_files
from qtrain.data.split import split_indices, split_seed
from qtrain.data.store import TokenRows, write_sequences
from qtrain.errors import DataError


@dataclass(frozen=True)
class Source:
    """Files read in order as one source; `key` is the recipe key that named them."""

    key: str
    files: tuple[str, ...]
    weight: float = 1.0

    @property
    def label(self) -> str:
        return self.files[0] if len(self.files) == 1 else f"{self.key} ({len(self.files)} files)"


@dataclass(frozen=True)
class Plan:
    """Everything that decides a build's output (and so its cache key), minus the tokenizer."""

    sources: tuple[Source, ...]
    eval_source: Source | None
    spec: EncodeSpec
    packing: bool
    eval_split: float
    seed: int
    mixed: bool


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
    # Rows per training source after filtering (before a mixture re-draws them).
    source_rows: list[int] = field(default_factory=list)
    # Share of batch positions that are padding (set once the micro-batch size is known, see
    # DataBundle.header), and what it would be with unpacked rows padded to the longest.
    padding: float | None = None
    padding_unpacked: float | None = None

    def summary_line(self) -> str:
        """One line for the CLI, e.g. `data: 1500 rows -> 310 train / 16 eval sequences; ...`."""
        dropped = self.rows_dropped_overlong + self.rows_dropped_no_labels
        return (f"data: {self.rows_read} rows -> {self.train_sequences} train / "
                f"{self.eval_sequences} eval sequences; {self.train_tokens} train tokens, "
                f"{self.trained_tokens} trained; {self.rows_truncated} truncated, "
                f"{dropped} dropped "
                f"({self.rows_dropped_overlong} too long, {self.rows_dropped_no_labels} "
                f"with nothing to train)")


def make_plan(cfg: DataConfig, seed: int, encoder_decoder: bool) -> Plan:
    """The recipe's data section resolved to files (globs expanded)."""
    if cfg.mix is not None:
        sources = tuple(Source(f"data.mix[{i}].path", tuple(resolve_files(m.path, f"data.mix[{i}].path")), m.weight)
                        for i, m in enumerate(cfg.mix))
    else:
        if not cfg.path:
            raise DataError("data.path: not set; point it at a .jsonl/.json/.csv/.parquet file")
        sources = (Source("data.path", tuple(resolve_files(cfg.path, "data.path"))),)
    held = Source("data.eval_path", (cfg.eval_path,)) if cfg.eval_path else None
    spec = EncodeSpec(cfg.format, cfg.max_len, cfg.overlong, dict(cfg.fields), encoder_decoder)
    return Plan(sources, held, spec, cfg.packing, cfg.eval_split, seed, cfg.mix is not None)


def key_inputs(plan: Plan, tokenizer: Any) -> dict[str, Any]:
    """What the cache key is made of: file contents (not names), tokenizer, every setting."""
    def digests(source: Source) -> list[str]:
        for path in source.files:
            check_file(path, source.key)
        return [file_digest(p) for p in source.files]

    return {
        "sources": [{"files": digests(s), "weight": s.weight if plan.mixed else None} for s in plan.sources],
        "eval_files": digests(plan.eval_source) if plan.eval_source else None,
        "eval_split": None if plan.eval_source else plan.eval_split,
        "tokenizer": tokenizer_digest(tokenizer),
        "spec": asdict(plan.spec), "packing": plan.packing, "seed": plan.seed, "mixed": plan.mixed,
    }


def build(out: Path, plan: Plan, tokenizer: Any, num_proc: int, progress: bool) -> dict[str, Any]:
    """Write a complete build of `plan` into `out`; returns what the manifest records."""
    token_files, ranges, eval_range = _encode_all(out, plan, tokenizer, num_proc, progress)
    rows = TokenRows([out / f for f in token_files])
    status = np.concatenate([_column(out / f, "status") for f in token_files])
    train_groups, eval_rows = _split(plan, ranges, eval_range)
    report = _count(status, rows_read=len(rows))
    kept = [g[(status[g] & DROPPED) == 0] for g in train_groups]
    _check_training_left(plan, train_groups, kept, status)
    report.source_rows = [int(k.size) for k in kept]
    if plan.mixed:
        train = mixture_rows(kept, [s.weight for s in plan.sources], sum(k.size for k in kept), plan.seed)
    else:
        train = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    held = eval_rows[(status[eval_rows] & DROPPED) == 0]
    for name, ids, tag in (("train", train, "pack-train"), ("eval", held, "pack-eval")):
        offsets, members = _sequences(ids, rows.lengths, plan, f"{plan.seed}:{tag}", progress)
        write_sequences(out / f"{name}.arrow", offsets, members)
        if name == "train":
            report.train_sequences = int(offsets.size - 1)
            report.train_tokens = int(rows.lengths[members].sum())
            report.trained_tokens = int(rows.trained[members].sum())
        else:
            report.eval_sequences = int(offsets.size - 1)
    return {"token_files": token_files, "report": asdict(report), "packing": plan.packing,
            "seq2seq": plan.spec.encoder_decoder}


def _encode_all(out: Path, plan: Plan, tokenizer: Any, num_proc: int,
                progress: bool) -> tuple[list[str], list[tuple[int, int]], tuple[int, int] | None]:
    """Encode every file; (token files in row order, each training source's row range, eval's)."""
    raw_dir = out / "raw"
    token_files: list[str] = []
    ranges: list[tuple[int, int]] = []
    start = 0
    for source in plan.sources + ((plan.eval_source,) if plan.eval_source else ()):
        first = start
        for path in source.files:
            raw = read_rows(path, key=source.key, cache_dir=str(raw_dir), progress=progress)
            encoded = encode_dataset(raw, path, source.key, plan.spec, tokenizer,
                                     out / f"tokens-{len(token_files):05d}.arrow", num_proc, progress)
            token_files.extend(Path(c["filename"]).name for c in encoded.cache_files)
            start += raw.num_rows
        ranges.append((first, start))
    shutil.rmtree(raw_dir, ignore_errors=True)
    eval_range = ranges.pop() if plan.eval_source else None
    return token_files, ranges, eval_range


def _column(path: Path, name: str) -> np.ndarray:
    from qtrain.data.store import mmap_table

    return mmap_table(path).column(name).to_numpy()


def _split(plan: Plan, ranges: list[tuple[int, int]],
           eval_range: tuple[int, int] | None) -> tuple[list[np.ndarray], np.ndarray]:
    """Row ids of each training source and of eval: `eval_path` whole, else a seeded fraction of each source."""
    if eval_range is not None:
        return [np.arange(a, b) for a, b in ranges], np.arange(*eval_range)
    groups, held = [], [np.zeros(0, dtype=np.int64)]
    for i, (a, b) in enumerate(ranges):
        train, out = split_indices(b - a, plan.eval_split, split_seed(plan.seed, i))
        groups.append(a + np.asarray(train, dtype=np.int64))
        held.append(a + np.asarray(out, dtype=np.int64))
    return groups, np.concatenate(held)


def _count(status: np.ndarray, rows_read: int) -> DataReport:
    return DataReport(rows_read=rows_read,
                      rows_dropped_overlong=int(((status & DROPPED_OVERLONG) != 0).sum()),
                      rows_truncated=int(((status & TRUNCATED) != 0).sum()),
                      rows_dropped_no_labels=int(((status & DROPPED_NO_LABELS) != 0).sum()))


def _sequences(ids: np.ndarray, lengths: np.ndarray, plan: Plan, seed: str,
               progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, member rows): one row per sequence, or whole rows bin-packed into max_len."""
    if not plan.packing:
        return np.arange(ids.size + 1, dtype=np.int64), ids
    offsets, items = best_fit_decreasing(lengths[ids], plan.spec.max_len, seed, progress=progress)
    return offsets, ids[items]


def _check_training_left(plan: Plan, groups: list[np.ndarray], kept: list[np.ndarray], status: np.ndarray) -> None:
    """DataError when filtering left nothing to train on (in total, or in one source of a mixture)."""
    for source, group, k in zip(plan.sources, groups, kept):
        if k.size == 0 and (plan.mixed or not any(x.size for x in kept)):
            raise empty_training_error(source, plan.spec, status[group])


def empty_training_error(source: Source, spec: EncodeSpec, status: np.ndarray) -> DataError:
    overlong = int(((status & DROPPED_OVERLONG) != 0).sum())
    no_labels = int(((status & DROPPED_NO_LABELS) != 0).sum())
    truncated = bool(((status & TRUNCATED) != 0).any())
    reasons, fixes = [], []
    if overlong:
        reasons.append(f"{overlong} longer than data.max_len={spec.max_len} (data.overlong: drop)")
        fixes.append("raise data.max_len or set data.overlong: truncate")
    if no_labels:
        trunc = " after truncation to data.max_len" if truncated else ""
        reasons.append(f"{no_labels} with no tokens left to train{trunc}")
        fixes.append("raise data.max_len so responses fit" if truncated
                     else "make sure rows have a response / assistant turn")
    why = "; ".join(reasons) or "none"
    return DataError(f"{source.label}: no training sequences left: {status.size} rows read for training, "
                     f"all dropped ({why}); {' or '.join(fixes) or 'add rows'}")
