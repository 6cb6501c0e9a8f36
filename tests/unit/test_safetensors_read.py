"""Our mmap-free reader returns exactly what the safetensors library returns."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qtrain.errors import ModelError
from qtrain.models.safetensors_read import SafetensorsFile


@pytest.fixture()
def st_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(37, 64, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(5, 3, 2, generator=g),
        "c.bias": torch.randn(7, generator=g).half(),
        "d.ids": torch.arange(10, dtype=torch.int64),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def test_whole_tensors_equal_the_library(st_file):
    with safe_open(str(st_file), framework="pt") as ref, SafetensorsFile(st_file) as ours:
        assert sorted(ours.keys()) == sorted(ref.keys())
        for key in ref.keys():
            got, want = ours.read(key), ref.get_tensor(key)
            assert got.dtype == want.dtype and torch.equal(got, want), key


@pytest.mark.parametrize("rows", [1, 4, 36, 37, 100])
def test_row_chunks_concatenate_to_the_tensor(st_file, rows):
    with safe_open(str(st_file), framework="pt") as ref, SafetensorsFile(st_file) as ours:
        chunks = list(ours.row_chunks("a.weight", rows))
        assert all(c.shape[0] <= rows for c in chunks)
        assert torch.equal(torch.cat(chunks), ref.get_tensor("a.weight"))


@pytest.mark.parametrize("start,stop", [(0, 5), (10, 37), (30, 100), (37, 40), (3, 3)])
def test_row_ranges_equal_the_library_slice(st_file, start, stop):
    """What a sharded load reads: rank r's rows, clipped to the tensor (possibly none)."""
    with safe_open(str(st_file), framework="pt") as ref, SafetensorsFile(st_file) as ours:
        got, want = ours.rows("a.weight", start, stop), ref.get_slice("a.weight")[start:stop]
        assert got.shape == want.shape and torch.equal(got, want)


def test_truncated_file_is_a_model_error_naming_it(st_file):
    data = st_file.read_bytes()
    st_file.write_bytes(data[: len(data) - 16])
    with SafetensorsFile(st_file) as f, pytest.raises(ModelError, match="truncated"):
        for key in f.keys():
            f.read(key)


def test_garbage_header_is_a_model_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelError, match="bad.safetensors"):
        SafetensorsFile(bad)
