"""Linear-layer methods other than plain LoRA, on the same dispatch point as `lora_linear`.

    y0 = (x ⊙ c)·Wᵀ + b                                   the frozen base (c: (IA)³ on an FFN input)
    (IA)³ on an output:  y = l ⊙ y0
    DoRA:                y = y0 + (g - 1) ⊙ (y0 - b) + g ⊙ s·(drop(x)·Aᵀ)·Bᵀ,   g = m / ‖W + s·B·A‖_row
    BitFit:              y = y0 + β

The base product y0 is the same call `lora_linear` makes (torch GEMM on a dequantized W, or the
fused NF4 kernels with `backend="triton"`), so these methods get the fused path wherever LoRA
does and W is never kept between forward and backward (except `save_weight`, as for LoRA). The
extra terms are element-wise on [M, N] outputs and small GEMMs with A and B.

DoRA's row norm is not differentiated (the DoRA paper's choice, and peft's) and is computed
without W + s·B·A ever being formed:
    ‖W_i + s(BA)_i‖² = ‖W_i‖² + 2s·Σ_r B_ir (W·Aᵀ)_ir + s²·(B (A Aᵀ) Bᵀ)_ii
‖W_i‖² is the caller's cached `w_sq` (W is frozen); W·Aᵀ is one GEMM of A through the base (the
fused kernel on the triton path). Written as y0 + (g-1)⊙(y0-b) + ..., as peft computes it, a
fresh adapter (g = 1, B = 0) returns the base output bit for bit. Dropout applies to the LoRA
branch only (peft also applies it to the input of its second base product during training; this
keeps one base GEMM per forward; inference is identical).
"""

from __future__ import annotations

from typing import Optional

import torch

from qtrain_kernels.dispatch import NF4Buffers
from qtrain_kernels.lora_linear import (WeightFn, _fused, _fused_forward, dense_forward, dropped, low_rank_grads,
                                       low_rank_product)


def _base_forward(x2: torch.Tensor, weight_fn: WeightFn, bias, nf4, fused: bool):
    """(x2·Wᵀ + bias, W or None): the base product on the fused or torch path."""
    if fused:
        return _fused_forward(x2, nf4, bias, None, None, 0.0), None
    w = weight_fn(x2.dtype)
    return dense_forward(x2, w, bias, None, None, 0.0), w


def _base_dx(g: torch.Tensor, weight_fn: WeightFn, nf4, w) -> torch.Tensor:
    """g·W on the fused or torch path."""
    if nf4 is not None:
        from qtrain_kernels.triton.lora_matmul import lora_backward_dx

        return lora_backward_dx(g, nf4, None, None, 0.0, None, 0.0)
    w = weight_fn(g.dtype) if w is None else w
    return g @ w


def dora_norm(w_times_at: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
              w_sq: torch.Tensor) -> torch.Tensor:
    """‖W + s·B·A‖ per output row (in fp32, or wider inputs' own precision), from W·Aᵀ [N, r], A [r, K],
    B [N, r] and ‖W_row‖² [N]."""
    acc = _acc(w_times_at)
    a, b = lora_a.to(acc), lora_b.to(acc)
    cross = (b * w_times_at.to(acc)).sum(1)
    quad = ((b @ (a @ a.t())) * b).sum(1)
    return (w_sq.to(acc) + 2.0 * scale * cross + scale * scale * quad).clamp_min(0.0).sqrt()


def _acc(t: torch.Tensor) -> torch.dtype:
    """Reductions run in fp32 at least (fp64 stays fp64, for the tests' exact comparisons)."""
    return torch.promote_types(t.dtype, torch.float32)


def _w_times_at(a: torch.Tensor, weight_fn: WeightFn, nf4, w, fused: bool) -> torch.Tensor:
    """W·Aᵀ [N, r]: A pushed through the base like an input (the fused kernel where it runs)."""
    if fused:
        return _fused_forward(a, nf4, None, None, None, 0.0).t()
    w = weight_fn(a.dtype) if w is None else w
    return (a @ w.t()).t()  # the same product the fused path computes (A as the input rows)


class AdaptedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight_fn, bias, lora_a, lora_b, scale, dropout_p, save_weight, out_scale, dora, bias_delta,
                in_scale, w_sq, nf4, backend):
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        xs = x2 * in_scale.to(dtype) if in_scale is not None else x2
        fused = _fused(backend, xs, nf4)
        y0, w = _base_forward(xs, weight_fn, bias, nf4, fused)
        mask = xd = xa = a = b = z = g = norm = None
        if dora:
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            with low_rank_product():
                xd, mask = dropped(x2, dropout_p)
                xa = xd @ a.t()
                norm = dora_norm(_w_times_at(a, weight_fn, nf4, w, fused), lora_a, lora_b, scale, w_sq)
                low = (xa @ b.t()).mul_(scale)
            g = (out_scale.to(norm.dtype) / norm).to(dtype)
            u = y0 - bias.to(dtype) if bias is not None else y0
            y = y0 + (g - 1.0) * u + g * low
            z = u + low  # dL/dm = Σ_rows dy ⊙ z / ‖·‖
        elif out_scale is not None:
            g = out_scale.to(dtype)
            y, z = y0 * g, y0
        else:
            y = y0
        if bias_delta is not None:
            y = y + bias_delta.to(dtype)
        ctx.weight_fn, ctx.nf4 = weight_fn, (nf4 if fused else None)
        ctx.scale, ctx.dropout_p, ctx.x_shape = scale, dropout_p, x.shape
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (lora_a, out_scale, bias_delta, in_scale))
        ctx.save_for_backward(x2 if in_scale is not None else None, in_scale, xd, xa, mask, a, b, z, g, norm,
                              w if save_weight else None)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, in_scale, xd, xa, mask, a, b, z, g, norm, w = ctx.saved_tensors
        a_dtype, s_dtype, bias_dtype, in_dtype = ctx.dtypes
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        need = ctx.needs_input_grad
        d_out = d_delta = d_in = dx = da = db = None
        acc = _acc(dy)
        if need[10]:
            d_delta = dy.to(acc).sum(0).to(bias_dtype)
        gz = dy if g is None else dy * g
        if need[8]:
            d_out = (dy.to(acc) * z.to(acc)).sum(0)
            d_out = (d_out / norm if norm is not None else d_out).to(s_dtype)
        gb = gz @ b if b is not None else None
        if need[0] or need[11]:
            dxs = _base_dx(gz, ctx.weight_fn, ctx.nf4, w)
            if in_scale is not None:
                d_in = (dxs.to(acc) * x2.to(acc)).sum(0).to(in_dtype) if need[11] else None
                dxs = dxs * in_scale.to(dxs.dtype)
            if gb is not None:
                lo = gb @ a
                dxs = dxs.add_(lo if mask is None else lo * mask / (1.0 - ctx.dropout_p), alpha=ctx.scale)
            dx = dxs.view(ctx.x_shape) if need[0] else None
        if gb is not None:
            da, db = low_rank_grads(gz, gb, xd, xa, ctx.scale, a_dtype, need[3], need[4])
        return dx, None, None, da, db, None, None, None, d_out, None, d_delta, d_in, None, None, None


def adapted_linear(x: torch.Tensor, weight_fn: WeightFn, bias: Optional[torch.Tensor] = None,
                   lora_a: Optional[torch.Tensor] = None, lora_b: Optional[torch.Tensor] = None, scale: float = 1.0,
                   dropout_p: float = 0.0, save_weight: bool = False, *, out_scale: Optional[torch.Tensor] = None,
                   dora: bool = False, bias_delta: Optional[torch.Tensor] = None,
                   in_scale: Optional[torch.Tensor] = None, w_sq: Optional[torch.Tensor] = None,
                   nf4: Optional[NF4Buffers] = None, backend: str = "torch") -> torch.Tensor:
    """The formulas of the module docstring; exactly one of: `out_scale` ((IA)³, [N]), `dora` (with A, B,
    magnitude `out_scale` [N] and `w_sq` [N]), `in_scale` ((IA)³ on an FFN input, [K]), `bias_delta`
    (BitFit, [N]). Trainable tensors may be fp32 masters: they are cast to x's dtype inside and their
    gradients come back in their own dtype."""
    if dora and (lora_a is None or out_scale is None or w_sq is None):
        raise ValueError("dora=True needs lora_a, lora_b, the magnitude as out_scale and w_sq")
    return AdaptedLinearFunction.apply(x, weight_fn, bias, lora_a, lora_b, scale, dropout_p, save_weight, out_scale,
                                       dora, bias_delta, in_scale, w_sq, nf4, backend)


def adapted_linear_reference(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None,
                             lora_a: Optional[torch.Tensor] = None, lora_b: Optional[torch.Tensor] = None,
                             scale: float = 1.0, *, out_scale: Optional[torch.Tensor] = None, dora: bool = False,
                             bias_delta: Optional[torch.Tensor] = None,
                             in_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The textbook forms, differentiable by autograd (DoRA as in its paper: W' = m · V / ‖V‖, V = W + s·B·A
    with ‖V‖ detached). Tests compare `adapted_linear` to it."""
    xs = x * in_scale if in_scale is not None else x
    if dora:
        v = w + scale * (lora_b @ lora_a)
        merged = out_scale[:, None] * v / v.norm(dim=1, keepdim=True).detach()
        y = torch.nn.functional.linear(xs, merged, bias)
    else:
        y = torch.nn.functional.linear(xs, w, bias)
        if out_scale is not None:
            y = y * out_scale
    return y + bias_delta if bias_delta is not None else y
