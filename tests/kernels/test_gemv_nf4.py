"""The M ≤ 16 split-K GEMV against the forward reference (same bound as the fused forward)."""

import pytest
import torch
from kernel_checks import DEVICE, abs64, assert_bounded, bound, make_nf4, randn

from qtrain_kernels import dispatch
from qtrain_kernels.lora_linear import lora_forward_reference
from qtrain_kernels.triton.gemv_nf4 import nf4_gemv

SCALE = 0.5


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("n,k", [(130, 200), (48, 256)])
@pytest.mark.parametrize("r", [8, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("split_k", [1, 3])
def test_gemv_matches_reference(m, n, k, r, dtype, split_k):
    """split_k=3: three programs per column block sum into float32 with atomics (K=200: the last
    slab is partial, and quantization blocks straddle rows)."""
    nf4 = make_nf4(n, k, True, DEVICE, seed=k)
    x = randn(m, k, dtype=dtype, device=DEVICE, seed=1)
    a = randn(r, k, dtype=dtype, device=DEVICE, seed=2, scale=0.1)
    b = randn(n, r, dtype=dtype, device=DEVICE, seed=3, scale=0.1)
    bias = randn(n, dtype=dtype, device=DEVICE, seed=4)
    xa = x @ a.t()
    got = nf4_gemv(x, nf4, bias, xa, b, SCALE, split_k=split_k)
    ref = lora_forward_reference(x, nf4, bias, xa, b, SCALE)
    w = dispatch.dequantize_buffers_reference(nf4, dtype)
    mag = abs64(x) @ abs64(w).t() + SCALE * abs64(xa) @ abs64(b).t() + abs64(bias)
    assert_bounded(got, ref, mag, bound(k + r + 1, 3, dtype))


def test_gemv_without_lora_or_bias_and_row_limit():
    nf4 = make_nf4(48, 64, False, DEVICE)
    x = randn(1, 64, dtype=torch.float32, device=DEVICE, seed=5)
    w = dispatch.dequantize_buffers_reference(nf4, torch.float32)
    assert_bounded(nf4_gemv(x, nf4, None, None, None, 1.0, split_k=1), x @ w.t(), abs64(x) @ abs64(w).t(),
                   bound(64, 2, torch.float32))
    with pytest.raises(ValueError, match="at most 16 rows"):
        nf4_gemv(randn(17, 64, dtype=torch.float32, device=DEVICE, seed=6), nf4, None, None, None, 1.0)
