"""Inputs and error bounds shared by the kernel tests.

Tolerances are derived, not tuned: a kernel and its reference compute the same sums of the same
rounded inputs, in a different order. With u the unit roundoff of a format (fp32 2⁻²⁴, fp16
2⁻¹¹, bf16 2⁻⁸) and depth d the number of terms per output, each float32-accumulated sum is
within d·u32·Σ|terms| of the exact one (the standard γ_d bound), and each rounding to the output
dtype moves a value by at most u_out·|value|. So, elementwise,

    |kernel − reference| ≤ (2·d·u32 + R·u_out) · magnitude,

where magnitude = Σ|terms| (computed in float64 from the same inputs) and R counts the roundings
to the output dtype on both sides together (the fused kernel rounds once; the unfused reference
rounds after each GEMM). Nothing is loosened beyond that.
"""

from __future__ import annotations

import torch

from qtrain.quant.nf4 import NF4Spec, NF4Weight
from qtrain_kernels.dispatch import NF4Buffers

# Compiled kernels on CUDA tensors where there is a GPU, the interpreter on CPU tensors elsewhere.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
U32 = UNIT_ROUNDOFF[torch.float32]


def make_nf4(n: int, k: int, double_quant: bool = True, device: torch.device | str = "cpu", seed: int = 0,
             blocksize: int = 64) -> NF4Buffers:
    """An (n, k) weight quantized the way qtrain stores it (bitsandbytes' bytes), as kernel buffers."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    q = NF4Weight.quantize(w, NF4Spec(blocksize, double_quant)).to(device)
    return NF4Buffers(q.packed, q.absmax, (n, k), blocksize, q.absmax2, q.offset)


def randn(*shape: int, dtype: torch.dtype, device, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


def bound(depth: int, roundings: int, dtype: torch.dtype) -> float:
    """The relative factor of the module docstring: 2·depth·u32 + roundings·u_out."""
    return 2 * depth * U32 + roundings * UNIT_ROUNDOFF[dtype]


def assert_bounded(got: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor, rel: float) -> None:
    """|got − ref| ≤ rel·magnitude elementwise (plus the smallest normal fp32, for exact zeros)."""
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, got.dtype, ref.shape, ref.dtype)
    err = (got.detach().double() - ref.detach().double()).abs().cpu()
    allowed = rel * magnitude.double().cpu() + torch.finfo(torch.float32).tiny
    ratio = float((err / allowed).max())
    assert ratio <= 1.0, f"error reaches {ratio:.3g}x its bound (max err {float(err.max()):.3g}, rel {rel:.3g})"


def abs64(t: torch.Tensor) -> torch.Tensor:
    return t.double().abs().cpu()
