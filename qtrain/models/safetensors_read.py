"""Read tensors (or row ranges of them) from a .safetensors file with plain reads, no mmap.

`safetensors.safe_open` maps the whole file: every page the loader touches stays in the
process's resident set, and tensors it returns without a dtype change are views that keep the
mapping alive. Measured on the CPU benchmark model (225 MiB file), that held 193 MiB resident
after loading. Reading into tensors we allocate keeps only what the model keeps.

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

    def row_chunks(self, key: str, rows: int) -> Iterator[torch.Tensor]:
        """Consecutive blocks of `rows` rows (the last may be shorter), each its own tensor."""
        shape, dtype = self.shape(key), self._dtype(key)
        begin, _ = self._header[key]["data_offsets"]
        row_bytes = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
        for r in range(0, shape[0], rows):
            n = min(rows, shape[0] - r)
            yield self._read_into(torch.empty((n, *shape[1:]), dtype=dtype), begin + r * row_bytes)
