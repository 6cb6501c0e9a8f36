"""The LoRA layer's forward and gradients equal the dense textbook form; B = 0 leaves the base."""

import pytest
import torch
from torch import nn

from qtrain.peft.lora import LoRALinear, lora_scale
from qtrain.quant.linear import NF4Linear
from qtrain.quant.nf4 import NF4Spec
from qtrain_kernels.lora_linear import lora_linear_dense_reference

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 on both sides; only summation order differs


def assert_close_scaled(got: torch.Tensor, ref: torch.Tensor, eps: float) -> None:
    """|got - ref| <= eps * max|ref| elementwise: rounding of differently ordered sums."""
    torch.testing.assert_close(got, ref, rtol=0, atol=eps * float(ref.detach().abs().max()))


def _layer(base_kind: str, bias: bool, r: int = 8, rslora: bool = False) -> LoRALinear:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 80, generator=g) * 0.1
    b = torch.randn(48, generator=g) if bias else None
    if base_kind == "nf4":
        base = NF4Linear.from_weight(w, b, NF4Spec(64, True), backend="bnb")
    else:
        base = nn.Linear(80, 48, bias=bias)
        with torch.no_grad():
            base.weight.copy_(w)
            if bias:
                base.bias.copy_(b)
        base.requires_grad_(False)
    layer = LoRALinear(base, r=r, alpha=16, rslora=rslora)
    with torch.no_grad():
        layer.lora_B.weight.normal_(generator=g)
    return layer


def _dense_w(layer: LoRALinear) -> torch.Tensor:
    base = layer.base_layer
    return base.dense_weight(torch.float32) if isinstance(base, NF4Linear) else base.weight


@pytest.mark.parametrize("base_kind", ["nf4", "dense"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("save_weight", [False, True])
@pytest.mark.parametrize("dtype,eps", [(torch.float32, 1e-6), (torch.float64, 1e-13)])
def test_forward_and_grads_equal_dense_reference(base_kind, bias, save_weight, dtype, eps):
    layer = _layer(base_kind, bias).to(dtype)
    layer.save_weight_for_backward = save_weight
    x = torch.randn(3, 5, 80, dtype=dtype, requires_grad=True)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)

    a = layer.lora_A.weight.detach().clone().requires_grad_(True)
    b = layer.lora_B.weight.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    bias_t = layer.base_layer.bias
    y_ref = lora_linear_dense_reference(x2, _dense_w(layer).to(dtype), bias_t, a, b, layer.scale)
    y_ref.backward(gy)

    assert y.dtype == dtype
    assert_close_scaled(y, y_ref, eps)
    assert_close_scaled(x.grad, x2.grad, eps)
    assert_close_scaled(layer.lora_A.weight.grad, a.grad, eps)
    assert_close_scaled(layer.lora_B.weight.grad, b.grad, eps)


def test_dropout_branch_matches_manual_mask():
    layer = _layer("dense", bias=False)
    layer.dropout = 0.3
    x = torch.randn(4, 80, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    y.sum().backward()
    torch.manual_seed(7)
    mask = torch.empty_like(x, dtype=torch.bool).bernoulli_(0.7)
    a = layer.lora_A.weight.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    xd = x2 * mask / 0.7
    y_ref = x2 @ layer.base_layer.weight.t() + layer.scale * (xd @ a.t()) @ layer.lora_B.weight.detach().t()
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(x.grad, x2.grad, **TOL)
    torch.testing.assert_close(layer.lora_A.weight.grad, a.grad, **TOL)
    layer.eval()  # no dropout at eval: output is deterministic
    torch.testing.assert_close(layer(x), layer(x))


@pytest.mark.parametrize("base_kind", ["nf4", "dense"])
def test_fresh_adapter_is_exactly_the_base(base_kind):
    layer = _layer(base_kind, bias=True)
    with torch.no_grad():
        layer.lora_B.weight.zero_()
    x = torch.randn(6, 80)
    expected = torch.nn.functional.linear(x, _dense_w(layer), layer.base_layer.bias)
    assert torch.equal(layer(x), expected)


def test_frozen_base_gets_no_gradient_and_lora_params_are_fp32():
    layer = _layer("dense", bias=True)
    layer(torch.randn(2, 80)).sum().backward()
    assert layer.base_layer.weight.grad is None
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_B.weight.grad is not None


def test_bf16_autocast_keeps_fp32_grads():
    layer = _layer("nf4", bias=False)
    x = torch.randn(4, 80)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32


def test_scaling_rules():
    assert lora_scale(16, 32, rslora=False) == 2.0
    assert lora_scale(16, 32, rslora=True) == 8.0
    assert _layer("dense", False, r=4, rslora=True).scale == 8.0
