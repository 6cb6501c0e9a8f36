"""epoch_batches and BatchStream: disjoint equal rank shards, seeded reshuffles, exact resume."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtrain.data.sampler import BatchStream, MapBatches, epoch_batches
from qtrain.errors import DataError


def _flat(batches: list[list[int]]) -> list[int]:
    return [i for b in batches for i in b]


def _all_ranks(n, mbs, seed, epoch, world):
    return [epoch_batches(n, mbs, seed, epoch, rank=r, world_size=world) for r in range(world)]


def test_single_rank_epoch_is_a_permutation_cut_into_micro_batches():
    batches = epoch_batches(10, 3, seed=0, epoch=0)
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    assert sorted(_flat(batches)) == list(range(10))
    assert _flat(batches) != list(range(10))  # shuffled


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 200), mbs=st.integers(1, 9), world=st.integers(1, 8),
       seed=st.integers(0, 2**31), epoch=st.integers(0, 5))
def test_rank_shards_are_disjoint_equal_and_cover_all_but_the_tail(n, mbs, seed, epoch, world):
    if n < world:
        with pytest.raises(DataError):
            epoch_batches(n, mbs, seed, epoch, rank=0, world_size=world)
        return
    per_rank = _all_ranks(n, mbs, seed, epoch, world)
    shards = [_flat(b) for b in per_rank]

    assert len({len(b) for b in per_rank}) == 1  # same number of micro-batches everywhere
    assert all(len(s) == n // world for s in shards)
    assert all(1 <= len(batch) <= mbs for b in per_rank for batch in b)
    covered = _flat(shards)
    assert len(covered) == len(set(covered)) == n - n % world
    assert set(covered) <= set(range(n))


def test_fewer_items_than_a_full_step_still_gives_every_rank_one():
    per_rank = _all_ranks(5, 4, seed=1, epoch=0, world=4)
    assert [[len(x) for x in b] for b in per_rank] == [[1], [1], [1], [1]]


def test_fewer_items_than_ranks_is_a_data_error():
    with pytest.raises(DataError, match="3 sequences but there are 4 processes"):
        epoch_batches(3, 2, seed=0, epoch=0, rank=1, world_size=4)


@pytest.mark.parametrize("kwargs", [dict(micro_batch_size=0), dict(rank=2, world_size=2),
                                    dict(rank=-1, world_size=2)])
def test_bad_arguments_are_programming_errors(kwargs):
    args = dict(n_items=10, micro_batch_size=2, seed=0, epoch=0) | kwargs
    with pytest.raises(ValueError):
        epoch_batches(**args)


def test_reshuffles_per_epoch_reproducibly():
    epochs = [epoch_batches(64, 8, seed=5, epoch=e) for e in range(4)]
    assert len({tuple(_flat(b)) for b in epochs}) == 4
    assert epochs == [epoch_batches(64, 8, seed=5, epoch=e) for e in range(4)]
    assert epoch_batches(64, 8, seed=6, epoch=0) != epochs[0]
    # (seed, epoch) pairs that would collide under seed + epoch do not share an order.
    assert epoch_batches(64, 8, seed=6, epoch=0) != epoch_batches(64, 8, seed=5, epoch=1)


def test_stream_runs_epoch_after_epoch():
    stream = BatchStream(10, 4, seed=3, rank=1, world_size=2)
    assert stream.batches_per_epoch == 2
    got = list(itertools.islice(stream, 7))
    expected = [b for e in range(4) for b in epoch_batches(10, 4, 3, e, rank=1, world_size=2)]
    assert got == expected[:7]
    assert (stream.epoch, stream.position) == (3, 1)


@pytest.mark.parametrize("taken", [0, 1, 4, 5, 6, 13])
def test_stream_state_round_trip_resumes_exactly(taken):
    original = BatchStream(23, 5, seed=11)  # 5 batches per epoch
    for _ in range(taken):
        next(original)
    state = original.state_dict()
    assert set(state) >= {"epoch", "position"}
    assert state["epoch"] == taken // 5

    resumed = BatchStream(23, 5, seed=11)
    resumed.load_state_dict(dict(state))
    assert list(itertools.islice(resumed, 12)) == list(itertools.islice(original, 12))


def test_stream_refuses_state_from_a_different_data_size():
    state = BatchStream(23, 5, seed=11).state_dict()
    with pytest.raises(DataError, match="23"):
        BatchStream(24, 5, seed=11).load_state_dict(state)


def test_stream_refuses_a_position_past_the_epoch():
    with pytest.raises(DataError, match="position 9"):
        BatchStream(23, 5, seed=11).load_state_dict({"epoch": 2, "position": 9})


def test_map_batches_hand_out_the_examples_of_the_index_stream():
    data = [f"example {i}" for i in range(23)]
    for rank in (0, 1):
        got = list(itertools.islice(MapBatches(data, 3, seed=4, rank=rank, world_size=2), 9))
        indices = list(itertools.islice(BatchStream(23, 3, seed=4, rank=rank, world_size=2), 9))
        assert got == [[data[i] for i in b] for b in indices]
