"""Row parts of a frozen vocabulary matrix (qtrain.distributed.vocab_parts) and the row-range gather
that builds them (qtrain.distributed.collectives.gather_row_range)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from qtrain.distributed import collectives
from qtrain.distributed.vocab_parts import PartedEmbedding, PartedLinear, row_ranges, splittable
from qtrain.quant.shard import RowShard


@pytest.mark.parametrize("rows,budget_rows", [(301, 16), (300, 100), (7, 100), (5, 1)])
def test_row_ranges_cover_every_row_once_within_the_budget(rows, budget_rows):
    bounds = row_ranges(rows, 64, 64 * budget_rows)
    assert bounds[0][0] == 0 and bounds[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(0 < hi - lo <= budget_rows for lo, hi in bounds)
    assert len(bounds) == -(-rows // budget_rows)


def _parts(w: torch.Tensor, per: int) -> tuple[list[nn.Parameter], list[tuple[int, int]]]:
    bounds = row_ranges(w.shape[0], w.shape[1] * w.element_size(), per * w.shape[1] * w.element_size())
    return [nn.Parameter(w[lo:hi].clone(), requires_grad=False) for lo, hi in bounds], bounds


def test_parted_embedding_looks_up_the_same_rows_bit_for_bit():
    w = torch.randn(301, 16)
    parts, bounds = _parts(w, 16)
    emb = PartedEmbedding(parts, bounds, 16)
    ids = torch.tensor([[0, 15, 16, 17, 300, 299], [150, 151, 0, 300, 42, 43]])
    assert len(emb.parts) == 19 and emb.num_embeddings == 301 and emb.embedding_dim == 16
    assert torch.equal(emb(ids), nn.functional.embedding(ids, w))


def test_parted_linear_gives_the_logits_and_input_gradient_of_the_whole_head():
    torch.manual_seed(0)
    w = torch.randn(301, 16)
    parts, bounds = _parts(w, 16)
    head = PartedLinear(parts, bounds, 16)
    x = torch.randn(3, 5, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, ref = head(x), x_ref @ w.T
    assert out.shape == ref.shape == (3, 5, 301) and head.out_features == 301
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert all(p.grad is None for p in parts)  # frozen


def test_parted_modules_hold_the_given_parameters_not_copies():
    w = torch.randn(40, 8)
    parts, bounds = _parts(w, 16)
    emb, head = PartedEmbedding(parts, bounds, 8), PartedLinear(parts, bounds, 8)
    assert [m.weight for m in emb.parts] == parts and [m.weight for m in head.parts] == parts


def test_only_plain_frozen_vocabulary_matrices_are_split():
    frozen = nn.Embedding(10, 4).requires_grad_(False)
    assert splittable(frozen) and splittable(nn.Linear(4, 10, bias=False).requires_grad_(False))
    assert not splittable(nn.Embedding(10, 4))  # trainable (full fine-tuning)
    assert not splittable(nn.Embedding(10, 4, max_norm=1.0).requires_grad_(False))  # renormalizes rows it reads
    assert not splittable(nn.Linear(4, 10).requires_grad_(False))  # bias
    assert not splittable(nn.LayerNorm(4))


def _gather_ranges(rank: int, world: int, path: str, n: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        whole = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
        start, stop = RowShard(rank, world).rows(n)
        local = whole[start:stop].clone()
        for lo in range(n):
            for hi in range(lo + 1, n + 1):
                got = collectives.gather_row_range(local, n, lo, hi)
                assert torch.equal(got, whole[lo:hi]), (rank, lo, hi, got)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("n", [5, 4])  # 3 ranks: 2 + 2 + 1 rows, and 2 + 2 + none
def test_gather_row_range_returns_any_rows_from_the_ranks_that_hold_them(tmp_path, n):
    mp.spawn(_gather_ranges, args=(3, str(tmp_path / "store"), n), nprocs=3, join=True)
