"""Streaming and mixtures: exact resume from a saved position, rank shards, weights within sampling error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from qtrain.config.schema import DataConfig, MixSource
from qtrain.data import build_datasets
from qtrain.data.mix import window_counts
from qtrain.data.stream import WINDOW_ROWS
from qtrain.errors import DataError
from qtrain.models.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(ROOT / "data" / "quickstart" / "tokenizer"))


def _write(path: Path, tag: str, n: int) -> str:
    rows = [{"prompt": f"{tag} {i}:\n", "response": "word " * (1 + i % 7)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _ids(batches) -> list[list[tuple[int, ...]]]:
    return [[tuple(e.input_ids) for e in b] for b in batches]


def _take(stream, n: int) -> list:
    return [next(stream) for _ in range(n)]


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_stream_resumes_exactly_from_a_saved_position(tmp_path, tok, num_proc):
    mix = [MixSource(_write(tmp_path / "a.jsonl", "A", 700), 1.0),
           MixSource(_write(tmp_path / "b.jsonl", "B", 300), 2.0)]
    cfg = DataConfig(mix=mix, max_len=48, eval_split=0.0, streaming=True, num_proc=num_proc)
    bundle = build_datasets(cfg, tok, seed=3)
    assert bundle.train is None and bundle.cache_status == "streaming"
    stream = bundle.train_stream(4, seed=3)
    _take(stream, 300)  # into the second window (about 220 micro-batches each)
    state = json.loads(json.dumps(stream.state_dict()))  # as a checkpoint stores it
    assert state["window"] >= 1
    expected = _ids(_take(stream, 250))  # crosses into the next window
    resumed = bundle.train_stream(4, seed=3)
    resumed.load_state_dict(state)
    assert _ids(_take(resumed, 250)) == expected
    stream.close(), resumed.close()


def test_stream_ranks_take_their_slice_of_each_global_micro_batch(tmp_path, tok):
    cfg = DataConfig(path=_write(tmp_path / "a.jsonl", "A", 500), max_len=48, eval_split=0.0, streaming=True,
                     num_proc=1)
    bundle = build_datasets(cfg, tok, seed=0)
    single = _ids(_take(bundle.train_stream(6, seed=0), 30))
    ranks = [_ids(_take(bundle.train_stream(3, seed=0, rank=r, world_size=2), 30)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == single


def test_streaming_map_style_refuses_the_other_kinds_state(tmp_path, tok):
    path = _write(tmp_path / "a.jsonl", "A", 50)
    streamed = build_datasets(DataConfig(path=path, eval_split=0.0, streaming=True, num_proc=1), tok, 0)
    mapped = build_datasets(DataConfig(path=path, eval_split=0.0), tok, 0)
    with pytest.raises(DataError, match="streaming"):
        mapped.train_stream(2, 0).load_state_dict(streamed.train_stream(2, 0).state_dict())
    with pytest.raises(DataError, match="map-style"):
        streamed.train_stream(2, 0).load_state_dict(mapped.train_stream(2, 0).state_dict())


def _within(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_a_mixture_draws_sources_by_weight_within_sampling_error(tmp_path, tok):
    mix = [MixSource(_write(tmp_path / "a.jsonl", "A", 150), 3.0),
           MixSource(_write(tmp_path / "b.jsonl", "B", 450), 1.0)]
    bundle = build_datasets(DataConfig(mix=mix, max_len=48, packing=False, eval_split=0.1), tok, seed=0)
    names = [tok.decode(e.input_ids[1:2]) for e in bundle.train]
    n = len(names)
    assert n == 135 + 405  # as many draws as training rows in all sources
    assert _within(names.count("A"), n, 0.75)  # the small source is repeated to its weight
    assert names.count("A") > 135
    again = build_datasets(DataConfig(mix=mix, max_len=48, packing=False, eval_split=0.1), tok, seed=0)
    assert [e.input_ids for e in again.train] == [e.input_ids for e in bundle.train]  # deterministic by seed
    assert bundle.report.source_rows == [135, 405]
    assert len(bundle.eval) == 15 + 45  # each source's held-out rows, unweighted


def test_streamed_windows_follow_the_weights_within_sampling_error():
    counts = sum(window_counts([1.0, 4.0], WINDOW_ROWS, seed=0, window=k) for k in range(20))
    assert counts.sum() == 20 * WINDOW_ROWS
    assert _within(int(counts[0]), int(counts.sum()), 0.2)
    first, second = (window_counts([1.0, 4.0], WINDOW_ROWS, 0, k) for k in (0, 1))
    assert not np.array_equal(first, second)
