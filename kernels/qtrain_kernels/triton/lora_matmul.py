"""LoRA-fused GEMMs over an NF4 weight: the forward and the input gradient of `LoRALinearFunction`.

    forward   Y[M,N] = X·deq(W)ᵀ + s·XA·Bᵀ + b          XA = drop(X)·Aᵀ  (M×r)
    backward  dX[M,K] = G·deq(W) + s/(1-p)·(GB·A) ⊙ mask  GB = G·B        (M×r)

The frozen W (N×K, 4-bit) is dequantized tile by tile inside the K (resp. N) loop and never
written to memory: the unfused path (bitsandbytes dequant → cuBLAS → addmm for the LoRA term)
writes and re-reads a bf16 copy of W and makes one more pass over Y for the low-rank update.
The low-rank term is one extra `tl.dot` of depth r in the epilogue, on fp32 accumulators, so Y
is rounded once instead of twice.

What is *not* fused, on purpose: XA and GB are computed by torch (cuBLAS) before the kernel.
Both are saved/needed anyway (XA for dB, GB for dA), and computing them inside the tiles would
redo them in every one of the N/BN (resp. K/BK) column programs: r/BN more MMA work (12.5 % at
r=16, 50 % at r=64 with BN=128) against one extra read of X (resp. G). dA and dB stay torch
mms on the saved small tensors for the same reason.

Block sizes are fixed heuristics, not autotuned: the values below are a starting point for the
GPU session (see benchmarks/bench_kernels.py), not measured choices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qtrain_kernels.dispatch import NF4Buffers, interpreting, kernel_device
from qtrain_kernels.triton.nf4_dequant import dequant_tile, tables

GROUP_M = 8  # programs that share a W column block run close together (L2 reuse of the 4-bit tiles)


@triton.jit
def _tile_ids(M, N_OUT, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr):
    """Grouped (swizzled) program order: GROUP row blocks walk the same output column blocks."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N_OUT, BN)
    per_group = GROUP * grid_n
    first_m = (pid // per_group) * GROUP
    group_m = tl.minimum(grid_m - first_m, GROUP)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


@triton.jit
def _fwd_kernel(x_ptr, packed_ptr, absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, lut_ptr,
                bias_ptr, xa_ptr, b_ptr, y_ptr, M, N, K, R, scale, stride_xm, stride_xk,
                BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROW_ALIGNED: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, PRECISION: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        x = tl.load(x_rows + (k0 + rk)[None, :] * stride_xk, mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < K),
                    other=0.0)
        w = dequant_tile(packed_ptr, absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, lut_ptr, pid_n * BN, k0, N, K,
                         BLOCKSIZE, DOUBLE_QUANT, ROW_ALIGNED, BN, BK)
        # Round W to X's dtype exactly as the unfused path does (dequant to bf16, then GEMM).
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
    if HAS_LORA:
        rr = tl.arange(0, BR)
        xa = tl.load(xa_ptr + rm[:, None].to(tl.int64) * R + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R),
                     other=0.0)
        bt = tl.load(b_ptr + rn[None, :].to(tl.int64) * R + rr[:, None], mask=(rn[None, :] < N) & (rr[:, None] < R),
                     other=0.0)
        acc += scale * tl.dot(xa, bt, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _dx_kernel(g_ptr, packed_ptr, absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, lut_ptr,
               gb_ptr, a_ptr, mask_ptr, dx_ptr, M, N, K, R, scale, stride_gm, stride_gn,
               BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROW_ALIGNED: tl.constexpr,
               HAS_LORA: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP: tl.constexpr):
    pid_m, pid_k = _tile_ids(M, K, BM, BK, GROUP)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    rn = tl.arange(0, BN)
    g_rows = g_ptr + rm[:, None].to(tl.int64) * stride_gm
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, N, BN):
        g = tl.load(g_rows + (n0 + rn)[None, :] * stride_gn, mask=(rm[:, None] < M) & ((n0 + rn)[None, :] < N),
                    other=0.0)
        w = dequant_tile(packed_ptr, absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, lut_ptr, n0, pid_k * BK, N, K,
                         BLOCKSIZE, DOUBLE_QUANT, ROW_ALIGNED, BN, BK)
        acc = tl.dot(g, w.to(g.dtype), acc, input_precision=PRECISION)
    inside = (rm[:, None] < M) & (rk[None, :] < K)
    if HAS_LORA:
        rr = tl.arange(0, BR)
        gb = tl.load(gb_ptr + rm[:, None].to(tl.int64) * R + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R),
                     other=0.0)
        a = tl.load(a_ptr + rr[:, None].to(tl.int64) * K + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K),
                    other=0.0)
        low_rank = tl.dot(gb, a, input_precision=PRECISION)
        if HAS_MASK:  # the dropout mask of the forward, saved as bytes; scale already holds 1/(1-p)
            keep = tl.load(mask_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], mask=inside, other=0)
            low_rank = tl.where(keep != 0, low_rank, 0.0)
        acc += scale * low_rank
    dx = dx_ptr + rm[:, None].to(tl.int64) * K + rk[None, :]
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=inside)


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension >= 16


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs get torch's fp32 GEMM semantics: IEEE unless the user allowed TF32."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _blocks(m: int, blocksize: int, dtype: torch.dtype, aligned: bool) -> dict:
    """Tile sizes (BM, BN, BK: output-row, W-row and W-column blocks) and launch options.

    The interpreter runs each program as numpy calls, so there big tiles (few programs) are fastest.
    On GPU BK is a multiple of 64 so that Llama shapes take dequant_tile's ROW_ALIGNED path. The
    shared memory of each choice was checked by compiling for sm_80/sm_90 (cuda_compile_probe.py):
    fp32 and the unaligned path need fewer stages/smaller tiles to stay under A100's 163 KiB.
    """
    if interpreting():
        return dict(BM=32, BN=64, BK=64, num_warps=4, num_stages=1)
    bk = blocksize if blocksize in (64, 128) else 64
    if dtype == torch.float32:  # correctness path (fp32 training on GPU is rare), not tuned
        return dict(BM=32 if m <= 32 else 64, BN=64, BK=64, num_warps=4, num_stages=2)
    stages = 3 if aligned else 2
    if m <= 64:
        return dict(BM=max(16, triton.next_power_of_2(m)), BN=64, BK=bk, num_warps=4, num_stages=stages + 1)
    return dict(BM=128, BN=128, BK=bk, num_warps=8, num_stages=stages)


def _aligned(k: int, blocksize: int) -> bool:
    return k % blocksize == 0


def _nf4_args(nf4: NF4Buffers) -> tuple:
    lut, code = tables(nf4.packed.device)
    dq = nf4.double_quant
    return (nf4.packed, nf4.absmax, nf4.absmax2 if dq else nf4.absmax, nf4.offset if dq else nf4.absmax, code, lut)


def supports(nf4: NF4Buffers) -> bool:
    """The fused GEMMs read W row by row in bytes: K must be even (so must blocksize)."""
    return nf4.shape[1] % 2 == 0 and nf4.blocksize % 2 == 0


def lora_forward(x: torch.Tensor, nf4: NF4Buffers, bias: torch.Tensor | None, xa: torch.Tensor | None,
                 b: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Y = x·deq(W)ᵀ + bias + scale·xa·bᵀ for 2-D x (M×K); same signature as `lora_forward_reference`."""
    m, k = x.shape
    n = nf4.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    cfg = _blocks(m, nf4.blocksize, x.dtype, _aligned(k, nf4.blocksize))
    has_lora = xa is not None
    r = xa.shape[1] if has_lora else 0
    xa_c = xa.contiguous() if has_lora else x
    b_c = b.contiguous() if has_lora else x
    grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]),)
    with kernel_device(x):
        _fwd_kernel[grid](x, *_nf4_args(nf4), bias if bias is not None else x, xa_c, b_c, y, m, n, k, r, float(scale),
                          x.stride(0), x.stride(1), BLOCKSIZE=nf4.blocksize, DOUBLE_QUANT=nf4.double_quant,
                          ROW_ALIGNED=_aligned(k, nf4.blocksize) and cfg["BK"] % nf4.blocksize == 0,
                          HAS_BIAS=bias is not None, HAS_LORA=has_lora, PRECISION=_precision(x.dtype),
                          BR=_rank_block(r), GROUP=GROUP_M, enable_fp_fusion=False, **cfg)
    return y


def lora_backward_dx(g: torch.Tensor, nf4: NF4Buffers, gb: torch.Tensor | None, a: torch.Tensor | None,
                     scale: float, mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    """dX = g·deq(W) + scale/(1-p)·(gb·a) ⊙ mask for 2-D g (M×N); same signature as the reference."""
    m, n = g.shape
    k = nf4.shape[1]
    dx = torch.empty(m, k, dtype=g.dtype, device=g.device)
    if m == 0:
        return dx
    cfg = _blocks(m, nf4.blocksize, g.dtype, _aligned(k, nf4.blocksize))
    has_lora = gb is not None
    r = gb.shape[1] if has_lora else 0
    has_mask = has_lora and mask is not None
    eff_scale = scale / (1.0 - dropout_p) if has_mask else scale
    grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(k, cfg["BK"]),)
    with kernel_device(g):
        _dx_kernel[grid](g, *_nf4_args(nf4), gb.contiguous() if has_lora else g, a.contiguous() if has_lora else g,
                         mask.contiguous().view(torch.uint8) if has_mask else g, dx, m, n, k, r, float(eff_scale),
                         g.stride(0), g.stride(1), BLOCKSIZE=nf4.blocksize, DOUBLE_QUANT=nf4.double_quant,
                         ROW_ALIGNED=_aligned(k, nf4.blocksize) and cfg["BK"] % nf4.blocksize == 0,
                         HAS_LORA=has_lora, HAS_MASK=has_mask, PRECISION=_precision(g.dtype),
                         BR=_rank_block(r), GROUP=GROUP_M, enable_fp_fusion=False, **cfg)
    return dx
