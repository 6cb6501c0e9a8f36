"""Read tensors (or row ranges of them) from a .safetensors file with plain reads, no mmap.

`safetensors.safe_open` maps the whole file: every page the loader touches stays in the
process's resident set, and tensors it returns without a dtype change are views that keep the
mapping alive. Measured on the CPU benchmark model (225 MiB file), that held 193 MiB resident
after loading. Reading into tensors we allocate keeps only what the model keeps.

Kept over the library's `safe_open(...).get_slice(name)[rows]` (what tensor-parallel loaders
use; opened per tensor, so at most one tensor is mapped) because it measured better on both time
and peak memory, for whole tensors and for the row ranges a sharded load reads:
`python -m benchmarks.bench_safetensors_read` (a 298 MiB bf16 file read in 1M-value row chunks,
each converted to fp32; 2-core EPYC under load average ~6, so medians of 4-5 fresh processes):
rank 0's rows of 2 (`--world 2`) 0.97 s and +14 MiB peak RSS here vs 1.14 s and +30 MiB through
the library; whole tensors (`--world 1`) 1.25 s and +19 MiB vs 1.50 s and +46 MiB (the library's
extra peak is the mapped pages of the tensor being read). Re-measure on a quiet machine before
revisiting.

The format (a documented, stable layout): 8-byte little-endian header length, a JSON header
mapping names to {dtype, shape, data_offsets}, then the raw little-endian data.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Iterator

import torch

from qtrain.errors import ModelError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsFile:
    """An open .safetensors file: `keys()`, `shape(key)`, `read(key)`, `row_chunks(key, rows)`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fh = open(self.path, "rb")
        try:
            (n,) = struct.unpack("<Q", self._fh.read(8))
            header = json.loads(self._fh.read(n))
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            self._fh.close()
            raise ModelError(f"{self.path}: not a readable safetensors file ({exc})") from None
        header.pop("__metadata__", None)
        self._header = header
        self._data_start = 8 + n

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def _dtype(self, key: str) -> torch.dtype:
        name = self._header[key]["dtype"]
        if name not in _DTYPES:
            raise ModelError(f"{self.path}: tensor {key} has dtype {name}, which qtrain cannot load")
        return _DTYPES[name]

    def _read_into(self, out: torch.Tensor, offset: int) -> torch.Tensor:
        view = out.view(-1).view(torch.uint8).numpy()
        self._fh.seek(self._data_start + offset)
        if self._fh.readinto(memoryview(view)) != view.nbytes:
            raise ModelError(f"{self.path}: file is truncated (tensor data ends early)")
        return out

    def read(self, key: str) -> torch.Tensor:
        begin, _ = self._header[key]["data_offsets"]
        return self._read_into(torch.empty(self.shape(key), dtype=self._dtype(key)), begin)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `key` (clipped to its length), as a tensor of their own."""
        shape, dtype = self.shape(key), self._dtype(key)
        start, stop = min(start, shape[0]), min(stop, shape[0])
        begin, _ = self._header[key]["data_offsets"]
        row_bytes = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
        return self._read_into(torch.empty((max(0, stop - start), *shape[1:]), dtype=dtype), begin + start * row_bytes)

    def row_chunks(self, key: str, rows: int) -> Iterator[torch.Tensor]:
        """Consecutive blocks of `rows` rows (the last may be shorter), each its own tensor."""
        for r in range(0, self.shape(key)[0], rows):
            yield self.rows(key, r, r + rows)
