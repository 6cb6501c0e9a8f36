"""NF4 weight storage: the packed bytes and quantization state of one frozen linear weight.

Quantization goes through bitsandbytes when it is importable (it is a hard dependency), so the
stored bytes are bitsandbytes' bytes by construction; the pure-torch reference in
`qtrain_kernels.nf4_reference` is the fallback and the oracle the fused kernels are tested
against. Dequantization is dispatched in `qtrain_kernels.dispatch`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from qtrain_kernels import nf4_reference as ref
from qtrain_kernels.dispatch import dequantize_absmax, dequantize_nf4


@dataclass
class NF4Spec:
    blocksize: int = 64
    double_quant: bool = True


def _bnb_functional():
    try:
        import bitsandbytes.functional as bnbf
    except Exception:  # noqa: BLE001 - any import failure means: use the torch reference
        return None
    return bnbf


def rows_per_chunk(shape: tuple[int, ...], blocksize: int, chunk_elems: int) -> int:
    """Rows per chunk so that a chunk holds about `chunk_elems` values and ends on a block boundary."""
    cols = shape[-1]
    align = blocksize // math.gcd(cols, blocksize)  # rows whose values fill whole blocks
    return max(align, (chunk_elems // cols) // align * align)


def _quantize_flat(values: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D values → (packed uint8 (n//2, 1), float32 absmax), bitsandbytes' bytes."""
    bnbf = _bnb_functional()
    if bnbf is None:
        return ref.quantize_nf4(values, blocksize)
    packed, state = bnbf.quantize_4bit(values, blocksize=blocksize, compress_statistics=False, quant_type="nf4")
    return packed, state.absmax


def _double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 absmax → (uint8 codes, float32 second-level absmax, scalar offset), as bitsandbytes does."""
    bnbf = _bnb_functional()
    if bnbf is None:
        return ref.double_quantize_absmax(absmax)
    offset = absmax.mean()
    codes, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=ref.ABSMAX_BLOCKSIZE)
    return codes, state2.absmax, offset.reshape(())


class NF4Weight(torch.nn.Module):
    """Buffers of one NF4-quantized weight, laid out exactly as bitsandbytes stores them.

    Buffers: `packed` uint8 (numel//2, 1); `absmax` float32 (blocks,) or, with double
    quantization, uint8 codes plus `absmax2` float32 (ceil(blocks/256),) and scalar `offset`.
    """

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype,
                 spec: NF4Spec, absmax2: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.dtype = dtype
        self.spec = spec
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax)
        self.register_buffer("absmax2", absmax2)
        self.register_buffer("offset", offset)

    @classmethod
    def quantize(cls, weight: torch.Tensor, spec: NF4Spec, chunk_elems: int = 1 << 20) -> NF4Weight:
        """Quantize a float 2-D weight (on its own device) to NF4, about `chunk_elems` values at a time."""
        rows = rows_per_chunk(weight.shape, spec.blocksize, chunk_elems)
        chunks = (weight[i:i + rows] for i in range(0, weight.shape[0], rows))
        return cls.from_row_chunks(chunks, tuple(weight.shape), weight.dtype, spec)

    @classmethod
    def from_row_chunks(cls, chunks: Iterable[torch.Tensor], shape: tuple[int, int], dtype: torch.dtype,
                        spec: NF4Spec) -> NF4Weight:
        """Quantize a weight given as consecutive row blocks (see `rows_per_chunk`).

        Chunks start on quantization-block boundaries, so the bytes equal a one-shot
        quantization. Streaming bounds the temporaries (the bf16 rows plus float32/int32 copies,
        ~10 bytes per value) to one chunk: measured on a 6-layer, hidden-1024 model, one-shot
        per-tensor quantization left the process holding ~0.9x the bf16 model size in freed but
        unreturned heap.
        """
        packed_parts, absmax_parts = [], []
        for chunk in chunks:
            packed, absmax = _quantize_flat(chunk.to(dtype).reshape(-1), spec.blocksize)
            packed_parts.append(packed)
            absmax_parts.append(absmax)
        packed = torch.cat(packed_parts) if len(packed_parts) > 1 else packed_parts[0]
        absmax = torch.cat(absmax_parts) if len(absmax_parts) > 1 else absmax_parts[0]
        if not spec.double_quant:
            return cls(packed, absmax, shape, dtype, spec)
        codes, absmax2, offset = _double_quantize(absmax)
        return cls(packed, codes, shape, dtype, spec, absmax2, offset)

    def float_absmax(self, backend: str = "bnb") -> torch.Tensor:
        """The per-block float32 absmax (double quantization undone)."""
        if self.absmax2 is None:
            return self.absmax
        return dequantize_absmax(self.absmax, self.absmax2, self.offset, backend=backend)

    def dequantize(self, backend: str = "bnb") -> torch.Tensor:
        """The dense weight in the dtype it was quantized from."""
        return dequantize_nf4(self.packed, self.float_absmax(backend), self.shape, self.dtype, self.spec.blocksize,
                              backend=backend)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.absmax2 is not None else ""
        return f"shape={self.shape}, dtype={self.dtype}, blocksize={self.spec.blocksize}{dq}"
