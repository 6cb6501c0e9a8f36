"""Weighted mixtures of sources (`data.mix`): which source each drawn row comes from, by seed.

Each draw picks source i with probability weight_i / sum(weights); a source hands out its rows
in a seeded order and starts a fresh order when it runs out, so a small source is repeated and
a large one sampled, in the proportions asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qtrain.data.sampler import derive_seed


def probabilities(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def mixture_rows(groups: Sequence[np.ndarray], weights: Sequence[float], total: int, seed: int) -> np.ndarray:
    """`total` rows drawn from `groups` (one array of row ids per source) by weight.

    Draw k takes a source at random by weight and then that source's next row; the result is
    in draw order.
    """
    rng = np.random.default_rng(derive_seed(seed, "mix"))
    choice = rng.choice(len(groups), size=total, p=probabilities(weights))
    out = np.empty(total, dtype=np.int64)
    for i, group in enumerate(groups):
        slots = np.flatnonzero(choice == i)
        out[slots] = cycled(group, slots.size, derive_seed(seed, "mix", i))
    return out


def cycled(group: np.ndarray, count: int, seed: int) -> np.ndarray:
    """The first `count` rows of `group` in seeded orders, one fresh permutation per pass."""
    if count == 0:
        return np.empty(0, dtype=np.int64)
    if group.size == 0:
        raise ValueError("a mixture source with no rows cannot be drawn from")
    passes = -(-count // group.size)
    rng = np.random.default_rng(seed)
    return np.concatenate([group[rng.permutation(group.size)] for _ in range(passes)])[:count]


def window_counts(weights: Sequence[float], size: int, seed: int, window: int) -> np.ndarray:
    """For streaming: how many of the `size` rows of window `window` each source gives.

    A pure function of its arguments, so where every source stands at any window is a sum over
    the windows before it: resuming needs no replay of the draws.
    """
    rng = np.random.default_rng(derive_seed(seed, "stream-mix", window))
    return rng.multinomial(size, probabilities(weights))


def window_sources(weights: Sequence[float], size: int, seed: int, window: int) -> np.ndarray:
    """For streaming: the source of each row of window `window`, in order (counts as `window_counts`)."""
    rng = np.random.default_rng(derive_seed(seed, "stream-mix", window))
    counts = rng.multinomial(size, probabilities(weights))
    return rng.permutation(np.repeat(np.arange(len(counts)), counts))
