"""Fused LoRA GEMMs (forward, input gradient) against their torch references, over odd shapes.

Bounds (kernel_checks): forward depth K + r + 1 and R = 3 output roundings (the reference rounds
x·Wᵀ(+b), then the LoRA addmm; the kernel once); input gradient depth N + r and R = 4 (the
reference rounds g·W, gb·a and their sum). For fp32 that is ~2·depth·2⁻²⁴ (≤ 4e-5 here),
for fp16 about 3-4 fp16 half-ulps of the magnitude.
"""

import pytest
import torch
from kernel_checks import DEVICE, abs64, assert_bounded, bound, make_nf4, randn

from qtrain_kernels import dispatch
from qtrain_kernels.lora_linear import lora_backward_dx_reference, lora_forward_reference
from qtrain_kernels.triton.lora_matmul import lora_backward_dx, lora_forward

# (M, N, K): M = 1 and rows that are not a multiple of any tile; N not a multiple of BN; K = 64
# (one aligned tile), 128 (two), 96 and 200 (quantization blocks straddle rows: unaligned path).
SHAPES = [(1, 48, 64), (5, 130, 128), (33, 130, 200), (33, 48, 96), (70, 48, 200)]
RANKS = [8, 16, 64]
DTYPES = [torch.float32, torch.float16]
SCALE = 2.0


def _inputs(m: int, n: int, k: int, r: int, dtype: torch.dtype, seed: int = 0):
    x = randn(m, k, dtype=dtype, device=DEVICE, seed=seed)
    a = randn(r, k, dtype=dtype, device=DEVICE, seed=seed + 1, scale=0.1)
    b = randn(n, r, dtype=dtype, device=DEVICE, seed=seed + 2, scale=0.1)
    bias = randn(n, dtype=dtype, device=DEVICE, seed=seed + 3)
    return x, a, b, bias


def _forward_magnitude(x, w, bias, xa, b, scale):
    mag = abs64(x) @ abs64(w).t()
    if xa is not None:
        mag += scale * abs64(xa) @ abs64(b).t()
    return mag if bias is None else mag + abs64(bias)


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_forward_matches_reference(m, n, k, r, dtype, double_quant):
    nf4 = make_nf4(n, k, double_quant, DEVICE, seed=n + k)
    x, a, b, bias = _inputs(m, n, k, r, dtype)
    xa = x @ a.t()
    got = lora_forward(x, nf4, bias, xa, b, SCALE)
    ref = lora_forward_reference(x, nf4, bias, xa, b, SCALE)
    w = dispatch.dequantize_buffers_reference(nf4, dtype)
    assert_bounded(got, ref, _forward_magnitude(x, w, bias, xa, b, SCALE), bound(k + r + 1, 3, dtype))


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_input_grad_matches_reference(m, n, k, r, dtype, dropout):
    nf4 = make_nf4(n, k, True, DEVICE, seed=n + k)
    _, a, b, _ = _inputs(m, n, k, r, dtype)
    g = randn(m, n, dtype=dtype, device=DEVICE, seed=9)
    gb = g @ b
    mask = None
    if dropout:
        mask = torch.rand(m, k, generator=torch.Generator().manual_seed(4)).to(DEVICE) >= dropout
    got = lora_backward_dx(g, nf4, gb, a, SCALE, mask, dropout)
    ref = lora_backward_dx_reference(g, nf4, gb, a, SCALE, mask, dropout)
    w = dispatch.dequantize_buffers_reference(nf4, dtype)
    low_rank = SCALE / (1 - dropout) * abs64(gb) @ abs64(a)
    mag = abs64(g) @ abs64(w) + (low_rank if mask is None else low_rank * mask.cpu())
    assert_bounded(got, ref, mag, bound(n + r, 4, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_base_only_with_bias_and_strided_input(dtype):
    """No LoRA branch (a plain NF4 linear), a bias, and x as a non-contiguous view."""
    m, n, k = 33, 130, 200
    nf4 = make_nf4(n, k, True, DEVICE, seed=1)
    wide = randn(m, 2 * k, dtype=dtype, device=DEVICE, seed=2)
    x = wide[:, ::2]
    bias = randn(n, dtype=dtype, device=DEVICE, seed=3)
    got = lora_forward(x, nf4, bias, None, None, 1.0)
    ref = lora_forward_reference(x.contiguous(), nf4, bias, None, None, 1.0)
    w = dispatch.dequantize_buffers_reference(nf4, dtype)
    assert_bounded(got, ref, _forward_magnitude(x, w, bias, None, None, 1.0), bound(k + 1, 2, dtype))
    g = randn(m, 2 * n, dtype=dtype, device=DEVICE, seed=4)[:, ::2]
    dx = lora_backward_dx(g, nf4, None, None, 1.0, None, 0.0)
    assert_bounded(dx, lora_backward_dx_reference(g, nf4, None, None, 1.0, None, 0.0), abs64(g) @ abs64(w),
                   bound(n, 2, dtype))


@pytest.mark.parametrize("blocksize,k", [(128, 256), (128, 200), (256, 256)])
def test_other_blocksizes(blocksize, k):
    m, n, r, dtype = 33, 48, 16, torch.float32
    nf4 = make_nf4(n, k, True, DEVICE, seed=5, blocksize=blocksize)
    x, a, b, bias = _inputs(m, n, k, r, dtype)
    xa = x @ a.t()
    got = lora_forward(x, nf4, bias, xa, b, SCALE)
    w = dispatch.dequantize_buffers_reference(nf4, dtype)
    assert_bounded(got, lora_forward_reference(x, nf4, bias, xa, b, SCALE),
                   _forward_magnitude(x, w, bias, xa, b, SCALE), bound(k + r + 1, 3, dtype))
