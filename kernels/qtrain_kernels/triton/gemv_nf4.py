"""Skinny 4-bit GEMM for M ≤ 16 rows (generation): Y = X·deq(W)ᵀ + b + s·XA·Bᵀ.

At decode sizes the op is bound by reading W (0.5 byte per weight) and decoding it, not by math:
every W element is decoded exactly once (one program per BN×K_split slab), and the M ≤ 16 rows of
X ride along in one 16-row `tl.dot` (tensor cores pad M to 16 anyway; rows ≥ M are masked).

Few column blocks (N/BN) cannot fill a GPU, so K is split across programs (split-K): partial sums
go to a float32 buffer with atomic adds and are cast once at the end. The split-K program 0 adds
the bias and the low-rank term. Atomics make the summation order, and so the last bits of Y, vary
from run to run when split_k > 1; `split_k=1` is deterministic.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from qtrain_kernels.dispatch import NF4Buffers, interpreting, kernel_device
from qtrain_kernels.triton.lora_matmul import _precision, _rank_block
from qtrain_kernels.triton.nf4_dequant import dequant_tile, tables

MAX_M = 16


@triton.jit
def _gemv_kernel(x_ptr, packed_ptr, absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, lut_ptr,
                 bias_ptr, xa_ptr, b_ptr, out_ptr, M, N, K, R, scale, stride_xm, stride_xk, k_per_split,
                 BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROW_ALIGNED: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, ATOMIC: tl.constexpr, PRECISION: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < k_hi), other=0.0)
        w = dequant_tile(packed_ptr, absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, lut_ptr, pid_n * BN, k0, N, K,
                         BLOCKSIZE, DOUBLE_QUANT, ROW_ALIGNED, BN, BK)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
    if pid_k == 0:
        if HAS_LORA:
            rr = tl.arange(0, BR)
            xa = tl.load(xa_ptr + rm[:, None] * R + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
            bt = tl.load(b_ptr + rn[None, :].to(tl.int64) * R + rr[:, None],
                         mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)
            acc += scale * tl.dot(xa, bt, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None] * N + rn[None, :]
    inside = (rm[:, None] < M) & (rn[None, :] < N)
    if ATOMIC:
        tl.atomic_add(out, acc, mask=inside)
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=inside)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _blocks(dtype: torch.dtype, aligned: bool) -> dict:
    """Untuned starting point: 64 W rows × 128 columns per step (4 KiB of 4-bit weight).

    Shared memory checked for sm_80/sm_90 by compiling (cuda_compile_probe.py); fp32 and the
    unaligned path take fewer stages to stay under A100's 163 KiB.
    """
    if interpreting():
        return dict(BN=64, BK=64, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BN=64, BK=64, num_warps=4, num_stages=2)
    return dict(BN=64, BK=128, num_warps=4, num_stages=3 if aligned else 2)


def _split_k(x: torch.Tensor, n_blocks: int, k_blocks: int) -> int:
    """Enough programs for about two per SM, each still streaming >= 4 K blocks.

    1 (no atomics, a fixed summation order) under torch.use_deterministic_algorithms.
    """
    if not x.is_cuda or torch.are_deterministic_algorithms_enabled():
        return 1
    want = triton.cdiv(2 * _sm_count(x.device.index or 0), n_blocks)
    return max(1, min(want, k_blocks // 4))


def nf4_gemv(x: torch.Tensor, nf4: NF4Buffers, bias: torch.Tensor | None, xa: torch.Tensor | None,
             b: torch.Tensor | None, scale: float, split_k: int | None = None) -> torch.Tensor:
    """Same contract as `lora_matmul.lora_forward`, for 2-D x with at most 16 rows."""
    m, k = x.shape
    if m > MAX_M:
        raise ValueError(f"nf4_gemv: at most {MAX_M} rows, got {m}; use lora_matmul.lora_forward")
    n = nf4.shape[0]
    cfg = _blocks(x.dtype, k % nf4.blocksize == 0)
    bn, bk = cfg.pop("BN"), cfg.pop("BK")
    n_blocks, k_blocks = triton.cdiv(n, bn), triton.cdiv(k, bk)
    split = max(1, min(split_k or _split_k(x, n_blocks, k_blocks), k_blocks))
    k_per_split = triton.cdiv(k_blocks, split) * bk  # a multiple of BK keeps tiles block-aligned
    split = triton.cdiv(k, k_per_split)
    atomic = split > 1
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device) if atomic else \
        torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.to(x.dtype)
    has_lora = xa is not None
    r = xa.shape[1] if has_lora else 0
    lut, code = tables(nf4.packed.device)
    dq = nf4.double_quant
    with kernel_device(x):
        _gemv_kernel[(n_blocks, split)](
            x, nf4.packed, nf4.absmax, nf4.absmax2 if dq else nf4.absmax, nf4.offset if dq else nf4.absmax, code, lut,
            bias if bias is not None else x, xa.contiguous() if has_lora else x, b.contiguous() if has_lora else x,
            out, m, n, k, r, float(scale), x.stride(0), x.stride(1), k_per_split,
            BLOCKSIZE=nf4.blocksize, DOUBLE_QUANT=dq, ROW_ALIGNED=k % nf4.blocksize == 0 and bk % nf4.blocksize == 0,
            HAS_BIAS=bias is not None, HAS_LORA=has_lora, ATOMIC=atomic, PRECISION=_precision(x.dtype),
            BM=16, BN=bn, BK=bk, BR=_rank_block(r), enable_fp_fusion=False, **cfg)
    return out.to(x.dtype) if atomic else out
