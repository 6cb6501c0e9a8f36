"""Deterministic, rank-sharded micro-batches of dataset indices (and of examples), resumable mid-epoch."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from qtrain.errors import DataError


def epoch_batches(n_items: int, micro_batch_size: int, seed: int, epoch: int | str,
                  rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's micro-batches of indices for one epoch.

    The epoch's permutation of range(n_items) depends only on (seed, epoch), so every rank
    computes the same one. It is cut into *global* micro-batches of micro_batch_size x
    world_size items and each rank takes its own slice of every global micro-batch. So the
    ranks' k-th micro-batches together are exactly the k-th micro-batch a single process with
    micro_batch_size x world_size would see: data-parallel training matches single-process
    training on the same data. The last `n_items % world_size` items of the permutation are
    left out so that every rank gets the same number of items and micro-batches (a rank with
    one batch fewer would leave the others waiting in a collective forever).

    Raises:
        DataError: fewer items than ranks.
    """
    _check_args(micro_batch_size, rank, world_size)
    if n_items < world_size:
        raise DataError(f"the training set has {n_items} sequences but there are {world_size} "
                        "processes, and every process needs at least one; add data or use fewer "
                        "processes")
    generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    order = torch.randperm(n_items, generator=generator).tolist()
    usable = n_items - n_items % world_size
    step = micro_batch_size * world_size
    batches = []
    for start in range(0, usable, step):
        chunk = order[start:min(start + step, usable)]
        per_rank = len(chunk) // world_size
        batches.append(chunk[rank * per_rank:(rank + 1) * per_rank])
    return batches


def _check_args(micro_batch_size: int, rank: int, world_size: int) -> None:
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from `parts` (e.g. the recipe seed and a purpose), the same in every process.

    A hash rather than e.g. seed + epoch, so that distinct parts never share a stream;
    blake2b (unlike hash()) does not change between processes.
    """
    text = "qtrain:" + ":".join(map(str, parts))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _epoch_seed(seed: int, epoch: int | str) -> int:
    return derive_seed(seed, epoch)


class BatchStream:
    """Micro-batches of indices forever: epoch after epoch, reshuffled each epoch.

    `state_dict()` records (epoch, position), position being the number of this epoch's
    micro-batches already handed out; loading it continues with exactly the next batch.
    """

    def __init__(self, n_items: int, micro_batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.n_items, self.micro_batch_size, self.seed = n_items, micro_batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0
        self._batches = self._epoch(0)

    def _epoch(self, epoch: int) -> list[list[int]]:
        return epoch_batches(self.n_items, self.micro_batch_size, self.seed, epoch,
                             self.rank, self.world_size)

    @property
    def batches_per_epoch(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        batch = self._batches[self.position]
        self.position += 1
        if self.position == len(self._batches):
            # Roll over now, so a state saved at an epoch's end reads (next epoch, 0).
            self.epoch += 1
            self.position = 0
            self._batches = self._epoch(self.epoch)
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "n_items": self.n_items}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`.

        Raises:
            DataError: the state was saved for a data set of a different size, so its
                position would point at different sequences.
        """
        saved_n = state.get("n_items", self.n_items)
        if saved_n != self.n_items:
            raise DataError(f"cannot resume the data order: it was saved for {saved_n} training "
                            f"sequences and the data now has {self.n_items}; resume with the same "
                            "data and data settings, or start a new run")
        epoch, position = int(state["epoch"]), int(state["position"])
        batches = self._batches if epoch == self.epoch else self._epoch(epoch)
        if not 0 <= position < len(batches):
            raise DataError(f"cannot resume the data order: position {position} is outside "
                            f"epoch {epoch}'s {len(batches)} micro-batches; the saved state does "
                            "not belong to this data and batch size")
        self.epoch, self.position, self._batches = epoch, position, batches


class MapBatches:
    """Micro-batches of examples from a sequence-like data set (`len`, `[i]`), sharded by `BatchStream`.

    This is what the trainer iterates (`DataBundle.train_stream`); the streaming data set has
    the same interface, so the loop does not know which one it reads.
    """

    def __init__(self, sequences: Sequence[Any], micro_batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.sequences = sequences
        self.indices = BatchStream(len(sequences), micro_batch_size, seed, rank, world_size)

    def __iter__(self) -> Iterator[list[Any]]:
        return self

    def __next__(self) -> list[Any]:
        return [self.sequences[i] for i in next(self.indices)]

    def state_dict(self) -> dict[str, int]:
        return self.indices.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") == "stream":
            raise DataError("cannot resume the data order: the checkpoint was saved while streaming "
                            "(data.streaming: true) and this run reads map-style data; resume with the same "
                            "data settings, or start a new run")
        self.indices.load_state_dict(state)
