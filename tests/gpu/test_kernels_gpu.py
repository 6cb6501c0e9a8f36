"""The Triton kernels in bf16 on a GPU: against the torch references, bitsandbytes and peft.

The CPU suite (tests/kernels) runs the same kernels in the interpreter, which cannot do bf16
`tl.dot`; this file covers bf16 and Llama-8B shapes. Bounds follow tests/kernels/kernel_checks.py:
|kernel − other| ≤ (2·depth·u32 + R·u_bf16)·magnitude elementwise, u_bf16 = 2⁻⁸, R the number of
roundings to bf16 on both sides together. The references must accumulate in fp32, so cuBLAS's
reduced-precision bf16 reductions and TF32 are switched off for this module.

Kernel modules are imported inside the tests: importing them here would run `@triton.jit` at
collection, before tests/kernels/conftest.py chooses the interpreter on a CPU machine.
"""

import pytest
import torch

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
U32 = 2.0 ** -24
U_OUT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}
LLAMA_8B = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N, K): q/o_proj, gate/up_proj, down_proj


@pytest.fixture(autouse=True)
def _fp32_accumulating_references():
    flags = torch.backends.cuda.matmul
    saved = flags.allow_bf16_reduced_precision_reduction, flags.allow_tf32
    flags.allow_bf16_reduced_precision_reduction, flags.allow_tf32 = False, False
    yield
    flags.allow_bf16_reduced_precision_reduction, flags.allow_tf32 = saved


def _rand(*shape: int, seed: int, scale: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=DEVICE) * scale).to(dtype or DTYPE)


def _mm_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.float().abs() @ b.float().abs()


def _assert_bounded(got, ref, magnitude, depth: int, roundings: int, u_out: float | None = None) -> None:
    """u_out: the roundoff of the dtype the roundings happen in (default: got's dtype)."""
    assert got.shape == ref.shape and got.dtype == ref.dtype
    rel = 2 * depth * U32 + roundings * (U_OUT[got.dtype] if u_out is None else u_out)
    ratio = float(((got.detach().float() - ref.detach().float()).abs() / (rel * magnitude + 1e-30)).max())
    assert ratio <= 1.0, f"error reaches {ratio:.3g}x its bound"


def _bnb_linear(n: int, k: int, seed: int, bias: bool = True):
    """A bitsandbytes Linear4bit (NF4, double quant) and the same bytes as qtrain's kernel buffers."""
    bnb = pytest.importorskip("bitsandbytes")
    from qtrain_kernels.dispatch import NF4Buffers

    layer = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=DTYPE, compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(_rand(n, k, seed=seed, scale=0.05, dtype=torch.float32).cpu(),
                                     requires_grad=False, compress_statistics=True, quant_type="nf4", blocksize=64)
    if bias:
        layer.bias = torch.nn.Parameter(_rand(n, seed=seed + 1, dtype=torch.float32).cpu(), requires_grad=False)
    layer = layer.to(DEVICE)
    qs = layer.weight.quant_state
    nf4 = NF4Buffers(layer.weight.data, qs.absmax, (n, k), qs.blocksize, qs.state2.absmax, qs.offset)
    return layer, nf4


@pytest.mark.parametrize("n,k", LLAMA_8B + [(130, 200), (33, 7), (48, 80)])  # (48, 80): bnb's CPU op is wrong there
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequant_bit_exact_with_bitsandbytes_cuda(n, k, dtype):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from qtrain_kernels import dispatch
    from qtrain_kernels.triton import nf4_dequant

    w = _rand(n, k, seed=n + k, dtype=dtype)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    got = nf4_dequant.dequantize_nf4_double_quant(packed, state.absmax, state.state2.absmax, state.offset, (n, k),
                                                  dtype)
    assert torch.equal(got, bnbf.dequantize_4bit(packed, state))
    nf4 = dispatch.NF4Buffers(packed, state.absmax, (n, k), 64, state.state2.absmax, state.offset)
    assert torch.equal(got, dispatch.dequantize_buffers_reference(nf4, dtype))


@pytest.mark.parametrize("n,k", LLAMA_8B)
@pytest.mark.parametrize("m", [1, 16, 333, 2048])
def test_forward_and_input_grad_bf16_llama_shapes(n, k, m):
    """Forward: depth K + r + 1, R = 3; input gradient: depth N + r, R = 4 (see test_lora_matmul)."""
    from qtrain_kernels import dispatch
    from qtrain_kernels.lora_linear import lora_backward_dx_reference, lora_forward_reference
    from qtrain_kernels.triton import gemv_nf4, lora_matmul

    r, scale = 16, 2.0
    _, nf4 = _bnb_linear(n, k, seed=m)
    x, a, b = _rand(m, k, seed=1), _rand(r, k, seed=2, scale=0.02), _rand(n, r, seed=3, scale=0.02)
    bias = _rand(n, seed=4)
    xa = x @ a.t()
    fwd = gemv_nf4.nf4_gemv if m <= gemv_nf4.MAX_M else lora_matmul.lora_forward
    w = dispatch.dequantize_buffers_reference(nf4, DTYPE)
    mag = _mm_abs(x, w.t()) + scale * _mm_abs(xa, b.t()) + bias.float().abs()
    _assert_bounded(fwd(x, nf4, bias, xa, b, scale), lora_forward_reference(x, nf4, bias, xa, b, scale), mag,
                    k + r + 1, 3)
    g = _rand(m, n, seed=5)
    gb = g @ b
    mask = torch.rand(m, k, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(6)) >= 0.1
    dx = lora_matmul.lora_backward_dx(g, nf4, gb, a, scale, mask, 0.1)
    mag = _mm_abs(g, w) + scale / 0.9 * _mm_abs(gb, a)
    _assert_bounded(dx, lora_backward_dx_reference(g, nf4, gb, a, scale, mask, 0.1), mag, n + r, 4)


@pytest.mark.parametrize("m", [1, 7, 16])
def test_gemv_against_bitsandbytes_inference_kernel(m):
    """bnb.matmul_4bit on one row runs bitsandbytes' own 4-bit GEMV. Both sides round once
    (fp32 accumulation assumed on both), R = 2."""
    bnb = pytest.importorskip("bitsandbytes")
    from qtrain_kernels import dispatch
    from qtrain_kernels.triton.gemv_nf4 import nf4_gemv

    n, k = 14336, 4096
    layer, nf4 = _bnb_linear(n, k, seed=7, bias=False)
    x = _rand(m, k, seed=8)
    with torch.no_grad():
        theirs = bnb.matmul_4bit(x, layer.weight.t(), quant_state=layer.weight.quant_state)
    w = dispatch.dequantize_buffers_reference(nf4, DTYPE)
    _assert_bounded(nf4_gemv(x, nf4, None, None, None, 1.0), theirs, _mm_abs(x, w.t()), k, 2)


def test_lora_layer_against_peft_over_bitsandbytes():
    """qtrain's fused path vs peft's LoRA over bnb's Linear4bit on the same bytes and adapter.

    peft computes the LoRA branch in fp32 and rounds base output, branch and sum to bf16
    (3 roundings, +1 ours: R = 4 for y and dx). dA/dB: fp32 on peft's side, ours rounds x·Aᵀ or
    g·B and the product to bf16 (R = 3), depth M + K (dB) or M + N (dA).
    """
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    from qtrain_kernels import dispatch
    from qtrain_kernels.lora_linear import lora_linear

    m, n, k, r, alpha = 512, 4096, 4096, 16, 32
    layer, nf4 = _bnb_linear(n, k, seed=9)
    holder = torch.nn.Module()
    holder.proj = layer
    peft_model = get_peft_model(holder, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"]))
    lora = peft_model.base_model.model.proj
    with torch.no_grad():
        lora.lora_B["default"].weight.copy_(_rand(n, r, seed=10, scale=0.02, dtype=torch.float32))
    a_ref, b_ref = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    scale = alpha / r
    x, g = _rand(m, k, seed=11), _rand(m, n, seed=12)

    x_p = x.clone().requires_grad_(True)
    y_p = lora(x_p)
    y_p.backward(g)
    a = a_ref.detach().clone().requires_grad_(True)
    b = b_ref.detach().clone().requires_grad_(True)
    x_q = x.clone().requires_grad_(True)
    y_q = lora_linear(x_q, lambda dt: dispatch.dequantize_buffers(nf4, dt, "triton"), layer.bias.to(DTYPE), a, b,
                      scale, nf4=nf4, backend="triton")
    y_q.backward(g)

    w = dispatch.dequantize_buffers_reference(nf4, DTYPE)
    xa = _mm_abs(x, a_ref.t())
    _assert_bounded(y_q, y_p, _mm_abs(x, w.t()) + scale * xa @ b_ref.abs().t() + layer.bias.float().abs(), k + r + 1, 4)
    gb = _mm_abs(g, b_ref)
    _assert_bounded(x_q.grad, x_p.grad, _mm_abs(g, w) + scale * gb @ a_ref.abs(), n + r, 4)
    # fp32 grads on both sides; the 3 roundings are ours, to bf16
    _assert_bounded(a.grad, a_ref.grad, scale * gb.t() @ x.float().abs(), m + n, 3, U_OUT[DTYPE])
    _assert_bounded(b.grad, b_ref.grad, scale * g.float().abs().t() @ xa, m + k, 3, U_OUT[DTYPE])


@pytest.mark.parametrize("vocab", [32000, 128256])
def test_fused_ce_bf16_against_textbook(vocab):
    """Chunked fused linear-CE vs F.cross_entropy over full fp32 logits, as in tests/kernels
    (rel = 2·(V + H + 8)·u32 + (2 + 4·L)·u_bf16)."""
    import torch.nn.functional as F

    from qtrain_kernels.fused_ce import fused_linear_cross_entropy

    t, hdim = 1000, 4096
    hidden, weight = _rand(t, hdim, seed=13), _rand(vocab, hdim, seed=14, scale=0.02)
    labels = torch.randint(0, vocab, (t,), device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(15))
    labels[::3] = -100
    h = hidden.clone().requires_grad_(True)
    loss = fused_linear_cross_entropy(h, weight, labels, chunk_size=256, backend="triton")
    loss.backward()
    h_ref = hidden.clone().requires_grad_(True)
    logits = h_ref @ weight.t()
    ref = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
    ref.backward()
    big_l = float(logits.detach().abs().max())
    rel = 2 * (vocab + hdim + 8) * U32 + (2 + 4 * big_l) * U_OUT[DTYPE]
    p = torch.softmax(logits.detach().float(), dim=1)
    keep = labels != -100
    y = torch.zeros_like(p)
    y[keep, labels[keep]] = 1.0
    coef = (p + (p - y).abs()) * keep[:, None]
    dh_mag = coef @ weight.float().abs()
    assert float((h.grad.float() - h_ref.grad.float()).abs().div(rel * dh_mag + 1e-30).max()) <= 1.0
    lse = torch.logsumexp(logits.detach().float(), dim=1)
    assert abs(float(loss.detach()) - float(ref.detach())) <= rel * float(((1 + lse.abs() + big_l) * keep).sum())
