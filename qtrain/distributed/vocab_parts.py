"""A frozen vocabulary matrix (token embeddings, LM head) as row parts an engine gathers one at a time.

ZeRO-3 gathers a module's parameters whole before its forward. The unquantized embedding and LM
head are each the size of several decoder blocks' NF4 weights (Llama-3-70B: 2.1 GB in bf16 against
0.43 GB for a block), and on a gloo/CPU run a gather holds two copies (plus a third while
DeepSpeed's coalesced prefetch splits its flat buffer), so they set the peak memory of a rank.
Split into row parts, each its own submodule, the engine gathers and frees one part of about a
block's bytes at a time; the outputs are the same (the embedding's bit for bit, the head's logits
up to the GEMM's summation blocking).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


def row_ranges(rows: int, row_bytes: int, budget_bytes: int) -> list[tuple[int, int]]:
    """[lo, hi) of equal row parts (the last may be shorter) of at most `budget_bytes` each; one part
    for a matrix within the budget."""
    per = max(1, budget_bytes // max(1, row_bytes))
    n_parts = max(1, math.ceil(rows / per))
    per = math.ceil(rows / n_parts)
    return [(lo, min(rows, lo + per)) for lo in range(0, rows, per)]


def splittable(module: nn.Module) -> bool:
    """A plain frozen embedding or bias-free linear, which the row parts reproduce exactly."""
    if type(module) is nn.Embedding:
        plain = module.max_norm is None and not module.sparse
        return plain and not module.weight.requires_grad
    return type(module) is nn.Linear and module.bias is None and not module.weight.requires_grad


class _RowParts(nn.Module):
    """Row parts as submodules `parts`, each built by `make(rows)` around the given parameter itself
    (perhaps already partitioned by an engine), not a copy."""

    def __init__(self, make: Callable[[int], nn.Module], parts: list[nn.Parameter],
                 bounds: list[tuple[int, int]]) -> None:
        super().__init__()
        self.parts = nn.ModuleList()
        for p, (lo, hi) in zip(parts, bounds):
            part = make(hi - lo)
            part.weight = p
            self.parts.append(part)
        self.bounds = bounds

    @property
    def weight(self) -> nn.Parameter:
        """The first part's (for its dtype and device; the rows are in `parts`)."""
        return self.parts[0].weight


class PartedEmbedding(_RowParts):
    """`nn.Embedding` over row parts: each part looks up the ids in its range; every part is called
    on every forward (the engine's gathers stay in step across ranks)."""

    def __init__(self, parts: list[nn.Parameter], bounds: list[tuple[int, int]], dim: int) -> None:
        super().__init__(lambda rows: nn.Embedding(rows, dim, device="meta"), parts, bounds)
        self.num_embeddings, self.embedding_dim = bounds[-1][1], dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = None
        for part, (lo, hi) in zip(self.parts, self.bounds):
            inside = (ids >= lo) & (ids < hi)
            rows = part(torch.where(inside, ids - lo, 0))
            out = rows if out is None else torch.where(inside.unsqueeze(-1), rows, out)
        return out


class PartedLinear(_RowParts):
    """A bias-free `nn.Linear` over row parts of its weight: the parts' outputs side by side."""

    def __init__(self, parts: list[nn.Parameter], bounds: list[tuple[int, int]], dim: int) -> None:
        super().__init__(lambda rows: nn.Linear(dim, rows, bias=False, device="meta"), parts, bounds)
        self.in_features, self.out_features = dim, bounds[-1][1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)
