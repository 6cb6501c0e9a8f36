"""`adapted_linear` ((IA)³, DoRA, BitFit on the LoRA dispatch point) against the textbook forms, and its
fused NF4 path against its torch path.

Against the references the function runs in float64 on a dense W, so any difference is a wrong
formula or gradient, not rounding (1e-10 relative). On the fused path, with each kernel replaced by its reference, the fused path must equal the torch path bit for bit.
"""

import pytest
import torch
from kernel_checks import DEVICE, make_nf4, randn

from qtrain_kernels import dispatch
from qtrain_kernels.adapted_linear import adapted_linear, adapted_linear_reference

N, K, R, SCALE = 24, 32, 4, 2.0
MODES = ["ia3_out", "ia3_in", "dora", "bitfit"]


def _params(mode: str, dtype) -> dict:
    """The trainable tensors of `mode`, away from their identity init so every term matters."""
    g = dict(dtype=dtype, device=DEVICE)
    if mode == "ia3_out":
        return {"out_scale": 1 + randn(N, seed=7, scale=0.3, **g)}
    if mode == "ia3_in":
        return {"in_scale": 1 + randn(K, seed=7, scale=0.3, **g)}
    if mode == "bitfit":
        return {"bias_delta": randn(N, seed=7, scale=0.3, **g)}
    return {"lora_a": randn(R, K, seed=8, scale=0.2, **g), "lora_b": randn(N, R, seed=9, scale=0.2, **g),
            "out_scale": 1 + randn(N, seed=7, scale=0.3, **g)}


def _grads(fn, x, params, seed=5):
    x = x.detach().clone().requires_grad_(True)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    y = fn(x, params)
    y.backward(randn(*y.shape, dtype=y.dtype, device=DEVICE, seed=seed))
    return y.detach(), x.grad, {k: v.grad for k, v in params.items()}


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_forward_and_gradients_equal_the_textbook_forms(mode, with_bias):
    dt = torch.float64
    w = randn(N, K, dtype=dt, device=DEVICE, seed=1, scale=0.3)
    bias = randn(N, dtype=dt, device=DEVICE, seed=2) if with_bias else None
    x = randn(3, 5, K, dtype=dt, device=DEVICE, seed=3)
    dora = mode == "dora"
    w_sq = w.pow(2).sum(1)

    def ours(x, p):
        return adapted_linear(x, lambda dtype: w, bias, p.get("lora_a"), p.get("lora_b"), SCALE, dora=dora,
                              w_sq=w_sq if dora else None, **{k: v for k, v in p.items() if "lora" not in k})

    def reference(x, p):
        return adapted_linear_reference(x, w, bias, p.get("lora_a"), p.get("lora_b"), SCALE, dora=dora,
                                        **{k: v for k, v in p.items() if "lora" not in k})

    got, ref = _grads(ours, x, _params(mode, dt)), _grads(reference, x, _params(mode, dt))
    for a, b in [(got[0], ref[0]), (got[1], ref[1])] + [(got[2][k], ref[2][k]) for k in ref[2]]:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_identity_init_returns_the_base_output_bit_for_bit(mode):
    w = randn(N, K, dtype=torch.float32, device=DEVICE, seed=1, scale=0.3)
    bias = randn(N, dtype=torch.float32, device=DEVICE, seed=2)
    x = randn(4, K, dtype=torch.float32, device=DEVICE, seed=3)
    init = {"ia3_out": {"out_scale": torch.ones(N)}, "ia3_in": {"in_scale": torch.ones(K)},
            "bitfit": {"bias_delta": torch.zeros(N)},
            "dora": {"lora_a": randn(R, K, dtype=torch.float32, device=DEVICE, seed=4), "lora_b": torch.zeros(N, R),
                     "out_scale": w.pow(2).sum(1).sqrt(), "dora": True, "w_sq": w.pow(2).sum(1)}}[mode]
    y = adapted_linear(x, lambda dtype: w, bias, init.pop("lora_a", None), init.pop("lora_b", None), SCALE, **init)
    assert torch.equal(y, torch.addmm(bias, x, w.t()))


@pytest.mark.parametrize("rows", [3, 18])  # 3 rows take the GEMV, 18 the GEMM
@pytest.mark.parametrize("mode", MODES)
def test_fused_path_calls_the_kernels_where_the_torch_path_multiplies(mode, rows, monkeypatch):
    """With each fused kernel replaced by its reference (same signature, checked against the kernel in
    test_lora_matmul / test_gemv_nf4), the fused path must equal the torch path bit for bit, without W."""
    from qtrain_kernels.lora_linear import lora_backward_dx_reference, lora_forward_reference
    from qtrain_kernels.triton import gemv_nf4, lora_matmul

    calls = []
    for module, name, ref in [(lora_matmul, "lora_forward", lora_forward_reference),
                              (gemv_nf4, "nf4_gemv", lora_forward_reference),
                              (lora_matmul, "lora_backward_dx", lora_backward_dx_reference)]:
        monkeypatch.setattr(module, name, lambda *a, _ref=ref, _n=name, **k: calls.append(_n) or _ref(*a, **k))
    k = 2 * K
    nf4 = make_nf4(N, k, True, DEVICE, seed=3)
    w = dispatch.dequantize_buffers_reference(nf4, torch.float32)
    x = randn(rows, k, dtype=torch.float32, device=DEVICE, seed=1)
    params = _params(mode, torch.float32)
    if "in_scale" in params:
        params["in_scale"] = 1 + randn(k, dtype=torch.float32, device=DEVICE, seed=7, scale=0.3)
    if "lora_a" in params:
        params["lora_a"] = randn(R, k, dtype=torch.float32, device=DEVICE, seed=8, scale=0.2)
    extra = {"dora": True, "w_sq": w.pow(2).sum(1)} if mode == "dora" else {}

    def run(backend, weight_fn):
        def fn(x, p):
            return adapted_linear(x, weight_fn, None, p.get("lora_a"), p.get("lora_b"), SCALE, nf4=nf4,
                                  backend=backend, **extra, **{n: v for n, v in p.items() if "lora" not in n})
        return _grads(fn, x, params)

    fused = run("triton", _no_dense_weight)
    assert "lora_backward_dx" in calls and ("nf4_gemv" in calls or "lora_forward" in calls)
    torch_path = run("torch", lambda dtype: w)
    assert torch.equal(fused[0], torch_path[0]) and torch.equal(fused[1], torch_path[1])
    assert all(torch.equal(fused[2][n], torch_path[2][n]) for n in params)


def _no_dense_weight(dtype):
    raise AssertionError("the fused path must not materialize W")
