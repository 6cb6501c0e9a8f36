"""Sharded NF4: each rank quantizes only its rows, whole blocks, and together they are bitsandbytes' bytes."""

import pytest
import torch

bnbf = pytest.importorskip("bitsandbytes.functional")

from qtrain.errors import ModelError  # noqa: E402
from qtrain.models.load import load_model  # noqa: E402
from qtrain.quant.nf4 import NF4Spec, NF4Weight  # noqa: E402
from qtrain.quant.shard import RowShard, full_shape  # noqa: E402

SHAPES = [(64, 64), (33, 64), (33, 7), (160, 64), (5, 1000)]


def _bnb(w: torch.Tensor, double_quant: bool):
    return bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")


def _shards(w: torch.Tensor, world: int, double_quant: bool, chunk_elems: int = 1 << 20):
    """Every rank's NF4Weight; the all-gather is played by the test from the whole weight's absmax,
    after checking that each rank offers exactly its own blocks' absmax."""
    spec = NF4Spec(64, double_quant)
    whole = _bnb(w, False)[1].absmax
    per = -(-whole.numel() // world)
    padded = torch.zeros(per * world)
    padded[: whole.numel()] = whole
    chunks = list(padded.split(per))
    reads: list[list[tuple[int, int]]] = []
    out = []
    for rank in range(world):
        def gather(t, rank=rank):
            assert torch.equal(t, chunks[rank])
            return chunks

        log: list[tuple[int, int]] = []

        def read_rows(start, stop, log=log):
            log.append((start, stop))
            return w[start:stop]

        shard = RowShard(rank, world, gather)
        out.append(NF4Weight.quantize_rows(read_rows, tuple(w.shape), w.dtype, spec, shard, chunk_elems=chunk_elems))
        reads.append(log)
    return out, reads


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("double_quant", [True, False])
def test_rank_shards_together_are_bitsandbytes_bytes(shape, world, double_quant):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    packed, state = _bnb(w, double_quant)
    shards, _ = _shards(w, world, double_quant, chunk_elems=256)  # several chunks per rank
    rows = {s.qweight.shape[0] for s in shards}
    assert len(rows) == 1  # every rank holds the same number of whole blocks
    n_blocks = state.absmax.numel()
    padding = rows.pop() * world - n_blocks
    assert 0 <= padding < world  # less than one block row per rank
    qweight = torch.cat([s.qweight for s in shards])
    qabsmax = torch.cat([s.qabsmax for s in shards])
    assert torch.equal(qweight.reshape(-1)[: packed.numel()], packed.reshape(-1))
    assert torch.equal(qabsmax[:n_blocks], state.absmax)
    if double_quant:
        for s in shards:  # the small second level is the same on every rank
            assert torch.equal(s.absmax2, state.state2.absmax) and torch.equal(s.offset, state.offset.reshape(()))
    if world > 1:
        assert all(full_shape(s.qweight) == qweight.shape for s in shards)


def test_each_rank_reads_only_the_rows_of_its_blocks():
    w = torch.randn(96, 128)  # 2 blocks per row
    _, reads = _shards(w, 3, True, chunk_elems=1024)
    for rank, ranges in enumerate(reads):
        assert min(a for a, _ in ranges) == rank * 32 and max(b for _, b in ranges) == (rank + 1) * 32


def test_a_whole_weight_from_rows_equals_the_one_shot_quantization():
    w = torch.randn(48, 192)
    a = NF4Weight.quantize(w, NF4Spec(64, True))
    b = NF4Weight.quantize_rows(lambda s, e: w[s:e], (48, 192), w.dtype, NF4Spec(64, True), chunk_elems=640)
    assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax)
    assert full_shape(b.qweight) is None  # whole: nothing for an engine to adopt
    assert torch.equal(a.dequantize("reference"), b.dequantize("reference"))


def test_sharded_load_keeps_only_this_ranks_rows(tiny_base_dir):
    whole = load_model(tiny_base_dir, torch.float32, torch.device("cpu"), NF4Spec(64, False))
    parts = [load_model(tiny_base_dir, torch.float32, torch.device("cpu"), NF4Spec(64, False),
                        shard=RowShard(rank, 2)) for rank in range(2)]
    whole_params = dict(whole.named_parameters())
    for name, p0 in parts[0].named_parameters():
        p1 = dict(parts[1].named_parameters())[name]
        assert full_shape(p0) == whole_params[name].shape or name.endswith("qweight") or name.endswith("qabsmax")
        assert torch.equal(torch.cat([p0, p1])[: whole_params[name].shape[0]], whole_params[name]), name
    nf4_bytes = sum(m.nbytes() for m in whole.modules() if isinstance(m, NF4Weight))
    half = sum(m.nbytes() for m in parts[0].modules() if isinstance(m, NF4Weight))
    assert abs(half - nf4_bytes / 2) <= 14 * 33  # one padding row at most per weight (2 layers x 7)


def test_truncated_or_garbage_safetensors_are_model_errors_naming_the_file(tiny_base_dir, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_base_dir, base)
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    with pytest.raises(ModelError, match="model.safetensors"):
        load_model(base, torch.float32, torch.device("cpu"), None)
    weights.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        load_model(base, torch.float32, torch.device("cpu"), None)
