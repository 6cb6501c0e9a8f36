"""NF4 dequantization in Triton, and the tile decoder the fused GEMMs share.

Layout: bitsandbytes' (see `qtrain_kernels.nf4_reference`): row-major values, two 4-bit codes per
byte with the first value in the high nibble, one absmax per `blocksize` values, optionally
double-quantized (uint8 codes of the dynamic map, one float32 `absmax2` per 256 blocks, plus a
scalar `offset`).

Bit-exactness with the reference and with bitsandbytes (tested) rests on three choices:
- every value is `level * absmax` in float32, then one rounding to the output dtype;
- the double-quant decode is `code[c] * absmax2` then `+ offset`, two float32 roundings as in
  bitsandbytes (its blockwise kernel, then a torch add). The launches pass
  `enable_fp_fusion=False` so the compiler cannot contract them into one FMA (one rounding);
- bf16 output is rounded to nearest-even with integer ops on the float32 bits. On a GPU this is
  what `cvt.rn.bf16.f32` does anyway; the Triton interpreter's float32→bf16 cast truncates, and
  the integer form makes the interpreter's result the GPU's, so the CPU suite can test bf16 exactly.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from qtrain_kernels import nf4_reference as ref
from qtrain_kernels.dispatch import kernel_device

assert ref.ABSMAX_BLOCKSIZE == 256, "load_absmax hard-codes the second-level block of 256"
BLOCK_BYTES = 1024  # packed bytes per program (2048 values); memory-bound, so big blocks, few programs
_OUT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.lru_cache(maxsize=None)
def tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the 16 NF4 levels, the 256-entry dynamic map), float32 on `device`."""
    return torch.tensor(ref.NF4_LEVELS, dtype=torch.float32, device=device), ref.dynamic_map(device)


@triton.jit
def load_absmax(absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, blk, mask, DOUBLE_QUANT: tl.constexpr):
    """float32 absmax of quantization blocks `blk` (any shape); decodes double quantization."""
    if DOUBLE_QUANT:
        c = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scaled = tl.load(code_ptr + c) * tl.load(absmax2_ptr + blk // 256, mask=mask, other=0.0)
        return scaled + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def dequant_tile(packed_ptr, absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, lut_ptr, n0, k0, N, K,
                 BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROW_ALIGNED: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr):
    """float32 tile W[n0:n0+BN, k0:k0+BK] of an N×K NF4 weight, zeros outside W.

    Needs K even (every row starts on a byte) and k0 even. ROW_ALIGNED (K % BLOCKSIZE == 0 and
    BK % BLOCKSIZE == 0, true for every Llama shape) loads one absmax per 64 values and
    broadcasts it; otherwise quantization blocks straddle rows and each byte gathers its own.
    """
    rows = n0 + tl.arange(0, BN)
    bcols = k0 // 2 + tl.arange(0, BK // 2)
    half_k = K // 2
    inside = (rows[:, None] < N) & (bcols[None, :] < half_k)
    byte_idx = rows[:, None].to(tl.int64) * half_k + bcols[None, :]
    byte = tl.load(packed_ptr + byte_idx, mask=inside, other=0).to(tl.int32)
    hi = tl.load(lut_ptr + (byte >> 4))
    lo = tl.load(lut_ptr + (byte & 15))
    if ROW_ALIGNED:
        bcol = k0 // BLOCKSIZE + tl.arange(0, BK // BLOCKSIZE)
        blk = rows[:, None].to(tl.int64) * (K // BLOCKSIZE) + bcol[None, :]
        am = load_absmax(absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, blk,
                         (rows[:, None] < N) & (bcol[None, :] < K // BLOCKSIZE), DOUBLE_QUANT)
        am = tl.reshape(tl.broadcast_to(am[:, :, None], (BN, BK // BLOCKSIZE, BLOCKSIZE // 2)), (BN, BK // 2))
    else:
        am = load_absmax(absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, (byte_idx * 2) // BLOCKSIZE, inside,
                         DOUBLE_QUANT)
    am = tl.where(inside, am, 0.0)
    return tl.reshape(tl.join(hi * am, lo * am), (BN, BK))


@triton.jit
def _dequant_kernel(packed_ptr, absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, lut_ptr, out_ptr, n, nbytes,
                    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, OUT_KIND: tl.constexpr,
                    BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid * BLOCK + tl.arange(0, BLOCK)
    bmask = b < nbytes
    byte = tl.load(packed_ptr + b, mask=bmask, other=0).to(tl.int32)
    # Both nibbles of a byte share a quantization block (blocksize is even).
    am = load_absmax(absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, (b * 2) // BLOCKSIZE, bmask, DOUBLE_QUANT)
    vals = tl.reshape(tl.join(tl.load(lut_ptr + (byte >> 4)) * am, tl.load(lut_ptr + (byte & 15)) * am),
                      (2 * BLOCK,))
    o = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    omask = o < n  # an odd count leaves the last low nibble as padding
    if OUT_KIND == 2:
        bits = vals.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even (values are finite)
        tl.store(out_ptr + o, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=omask)
    else:
        tl.store(out_ptr + o, vals.to(out_ptr.dtype.element_ty), mask=omask)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _launch(packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None, offset: torch.Tensor | None,
            shape: tuple[int, ...], dtype: torch.dtype, blocksize: int, out: torch.Tensor | None) -> torch.Tensor:
    if dtype not in _OUT_KIND:
        raise ValueError(f"NF4 dequant: dtype {dtype} not supported (float32, float16, bfloat16)")
    if blocksize % 2:
        raise ValueError(f"NF4 dequant: blocksize must be even, got {blocksize}")
    n = _numel(shape)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    elif out.dtype != dtype or not out.is_contiguous() or out.numel() != n:
        raise ValueError(f"NF4 dequant: `out` must be a contiguous {dtype} tensor of {n} values")
    if n == 0:
        return out
    lut, code = tables(packed.device)
    target = out.view(torch.int16) if dtype == torch.bfloat16 else out
    nbytes = packed.numel()
    dq = absmax2 is not None
    grid = (triton.cdiv(nbytes, BLOCK_BYTES),)
    with kernel_device(packed):
        _dequant_kernel[grid](packed, absmax, absmax2 if dq else absmax, offset if dq else absmax, code, lut, target,
                              n, nbytes, BLOCKSIZE=blocksize, DOUBLE_QUANT=dq, OUT_KIND=_OUT_KIND[dtype],
                              BLOCK=BLOCK_BYTES, num_warps=4, enable_fp_fusion=False)
    return out


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                   blocksize: int = 64, out: torch.Tensor | None = None) -> torch.Tensor:
    """Same signature and bits as `nf4_reference.dequantize_nf4` (float32 absmax)."""
    return _launch(packed, absmax, None, None, shape, dtype, blocksize, out)


def dequantize_nf4_double_quant(packed: torch.Tensor, codes: torch.Tensor, absmax2: torch.Tensor,
                                offset: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                                blocksize: int = 64, out: torch.Tensor | None = None) -> torch.Tensor:
    """`dequantize_nf4` with the double-quantized absmax decoded in the same kernel.

    Reference: `nf4_reference.dequantize_nf4(packed, dequantize_absmax(codes, absmax2, offset), ...)`.
    """
    return _launch(packed, codes, absmax2, offset, shape, dtype, blocksize, out)
