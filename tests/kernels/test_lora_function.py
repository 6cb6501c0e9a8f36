"""`lora_linear(..., nf4=, backend="triton")` end to end: the fused path against the torch path.

Same inputs, same dropout seed. y and dx carry the GEMM bounds of test_lora_matmul; dA and dB are
the same torch mms of the same saved tensors on both paths, so they must be bit-identical.
"""

import pytest
import torch
from kernel_checks import DEVICE, abs64, assert_bounded, bound, make_nf4, randn

from qtrain_kernels import dispatch
from qtrain_kernels.lora_linear import lora_linear
from qtrain_kernels.triton import gemv_nf4, lora_matmul

N, K, R, SCALE = 130, 200, 16, 2.0


def _weight_fn(nf4):
    return lambda dtype: dispatch.dequantize_buffers_reference(nf4, dtype)


def _run(x, nf4, bias, a, b, p, backend, weight_fn=None, seed=11):
    x = x.detach().clone().requires_grad_(True)
    a = a.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # the dropout mask comes from torch's RNG on both paths
    y = lora_linear(x, weight_fn or _weight_fn(nf4), bias, a, b, SCALE, p, nf4=nf4, backend=backend)
    y.backward(randn(*y.shape, dtype=y.dtype, device=DEVICE, seed=5))
    return y.detach(), x.grad, a.grad, b.grad


class _Count:
    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("lead", [(1, 1), (3, 5), (2, 9)])  # M = 1 and 15 take the GEMV, 18 the GEMM
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_path_matches_torch_path(lead, dtype, dropout, with_bias, monkeypatch):
    nf4 = make_nf4(N, K, True, DEVICE, seed=3)
    x = randn(*lead, K, dtype=dtype, device=DEVICE, seed=1)
    a = randn(R, K, dtype=torch.float32, device=DEVICE, seed=2, scale=0.1)  # fp32 master weights
    b = randn(N, R, dtype=torch.float32, device=DEVICE, seed=3, scale=0.1)
    bias = randn(N, dtype=dtype, device=DEVICE, seed=4) if with_bias else None
    fwd = _Count(gemv_nf4.nf4_gemv if lead[0] * lead[1] <= 16 else lora_matmul.lora_forward)
    bwd = _Count(lora_matmul.lora_backward_dx)
    monkeypatch.setattr(gemv_nf4 if lead[0] * lead[1] <= 16 else lora_matmul, fwd.fn.__name__, fwd)
    monkeypatch.setattr(lora_matmul, "lora_backward_dx", bwd)

    def no_dense_weight(dtype):
        raise AssertionError("the fused path must not materialize W")

    y, dx, da, db = _run(x, nf4, bias, a, b, dropout, "triton", weight_fn=no_dense_weight)
    y_ref, dx_ref, da_ref, db_ref = _run(x, nf4, bias, a, b, dropout, "torch")
    assert fwd.calls == 1 and bwd.calls == 1

    w = dispatch.dequantize_buffers_reference(nf4, dtype)
    m = lead[0] * lead[1]
    x2, a_c, b_c = x.reshape(m, K), a.to(dtype), b.to(dtype)
    y_mag = abs64(x2) @ abs64(w).t() + SCALE / (1 - dropout) * (abs64(x2) @ abs64(a_c).t()) @ abs64(b_c).t()
    if bias is not None:
        y_mag += abs64(bias)
    assert_bounded(y, y_ref, y_mag.view(*lead, N), bound(K + R + 1, 3, dtype))
    g = randn(*lead, N, dtype=dtype, device=DEVICE, seed=5).reshape(m, N)
    dx_mag = abs64(g) @ abs64(w) + SCALE / (1 - dropout) * (abs64(g) @ abs64(b_c)) @ abs64(a_c)
    assert_bounded(dx, dx_ref, dx_mag.view(*lead, K), bound(N + R, 4, dtype))
    assert torch.equal(da, da_ref) and torch.equal(db, db_ref)
    assert da.dtype == torch.float32 and db.dtype == torch.float32


def test_falls_back_to_torch_where_the_kernels_do_not_apply():
    """No NF4 buffers (a dense base), or an odd in_features (rows not byte-aligned): torch path."""
    x = randn(20, 7, dtype=torch.float32, device=DEVICE, seed=1)
    odd = make_nf4(12, 7, True, DEVICE)
    w = dispatch.dequantize_buffers_reference(odd, torch.float32)
    y = lora_linear(x, _weight_fn(odd), None, nf4=odd, backend="triton")
    assert torch.equal(y, x @ w.t())
    y = lora_linear(x, lambda dtype: w, None, backend="triton")
    assert torch.equal(y, x @ w.t())


def test_cpu_tensors_without_interpreter_take_torch_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if DEVICE.type == "cuda":
        pytest.skip("on a CUDA machine the kernel tests run on CUDA tensors")
    nf4 = make_nf4(48, 64, True, DEVICE)
    x = randn(20, 64, dtype=torch.float32, device=DEVICE, seed=1)
    fwd = _Count(lora_matmul.lora_forward)
    monkeypatch.setattr(lora_matmul, "lora_forward", fwd)
    lora_linear(x, _weight_fn(nf4), None, nf4=nf4, backend="triton")
    assert fwd.calls == 0
