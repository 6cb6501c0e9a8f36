"""NF4 weight storage: the packed bytes and quantization state of one frozen linear weight.

Quantization goes through bitsandbytes when it is importable (it is a hard dependency), so the
stored bytes are bitsandbytes' bytes by construction; the pure-torch reference in
`qtrain_kernels.nf4_reference` is the fallback and the oracle the fused kernels are tested
against. Dequantization is dispatched in `qtrain_kernels.dispatch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtrain_kernels import nf4_reference as ref
from qtrain_kernels.dispatch import dequantize_nf4


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
    def quantize(cls, weight: torch.Tensor, spec: NF4Spec) -> NF4Weight:
        """Quantize a float weight (on its own device) to NF4."""
        bnbf = _bnb_functional()
        if bnbf is not None:
            packed, state = bnbf.quantize_4bit(weight, blocksize=spec.blocksize,
                                               compress_statistics=spec.double_quant, quant_type="nf4")
            if spec.double_quant:
                return cls(packed, state.absmax, weight.shape, weight.dtype, spec,
                           state.state2.absmax, state.offset.reshape(()))
            return cls(packed, state.absmax, weight.shape, weight.dtype, spec)
        packed, absmax = ref.quantize_nf4(weight, spec.blocksize)
        if spec.double_quant:
            codes, absmax2, offset = ref.double_quantize_absmax(absmax)
            return cls(packed, codes, weight.shape, weight.dtype, spec, absmax2, offset)
        return cls(packed, absmax, weight.shape, weight.dtype, spec)

    def float_absmax(self) -> torch.Tensor:
        """The per-block float32 absmax (double quantization undone)."""
        if self.absmax2 is None:
            return self.absmax
        return ref.dequantize_absmax(self.absmax, self.absmax2, self.offset)

    def dequantize(self, backend: str = "bnb") -> torch.Tensor:
        """The dense weight in the dtype it was quantized from."""
        return dequantize_nf4(self.packed, self.float_absmax(), self.shape, self.dtype, self.spec.blocksize,
                              backend=backend)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.absmax2 is not None else ""
        return f"shape={self.shape}, dtype={self.dtype}, blocksize={self.spec.blocksize}{dq}"
