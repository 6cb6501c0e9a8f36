"""The eval split: which rows are held out (by seed), and those rows' raw text for generation metrics."""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from qtrain.config.schema import DataConfig
from qtrain.data.read import read_rows


def split_indices(n: int, fraction: float, seed: int | str) -> tuple[list[int], list[int]]:
    """Hold out `fraction` of range(n) for eval, chosen by `seed`; both lists in file order.

    With fraction > 0 and n >= 2, eval gets at least one row and train keeps at least one.
    """
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    n_eval = min(n - 1, max(1, round(n * fraction)))
    held_out = set(random.Random(f"{seed}:eval-split").sample(range(n), n_eval))
    train = [i for i in range(n) if i not in held_out]
    return train, sorted(held_out)


def split_seed(seed: int, source_index: int) -> int | str:
    """The split seed of a training source: the recipe seed for the first (so one file splits as
    it always has), a derived one for the others of a mixture."""
    return seed if source_index == 0 else f"{seed}:{source_index}"


def held_out_rows(cfg: DataConfig, seed: int) -> list[tuple[str, int, dict[str, Any]]]:
    """The eval split's raw rows as (file, 1-based row number, row), in the order the build holds them.

    `data.eval_path` whole, else the rows `split_indices` holds out of each training source.
    """
    from qtrain.data.build import make_plan

    plan = make_plan(cfg, seed, encoder_decoder=False)
    if plan.eval_source is not None:
        path = plan.eval_source.files[0]
        return [(path, n, row) for n, row in enumerate(read_rows(path, key="data.eval_path").to_list(), start=1)]
    out = []
    for i, source in enumerate(plan.sources):
        files = [read_rows(path, key=source.key) for path in source.files]
        starts = np.cumsum([0] + [f.num_rows for f in files])
        _, held = split_indices(int(starts[-1]), plan.eval_split, split_seed(plan.seed, i))
        for index in held:
            k = int(np.searchsorted(starts, index, side="right")) - 1
            local = index - int(starts[k])
            out.append((source.files[k], local + 1, files[k][local]))
    return out
