"""LoRA linear over a frozen (possibly 4-bit) base: the single dispatch point of the hot path.

    y  = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ          W frozen, A (r×K) and B (N×r) trained
    dx = dy·W + s·((dy·B)·A) ⊙ mask/(1-p)
    dA = s·(dy·B)ᵀ·drop(x)        dB = s·dyᵀ·(drop(x)·Aᵀ)

W is never kept between forward and backward: backward dequantizes it again. The exception is
`save_weight=True`, meant for gradient checkpointing: there the first forward's saved tensors
are dropped by the checkpoint and the recomputed forward runs right before this layer's
backward, so keeping its W for that backward costs one layer's weights for a moment and saves
one of the three dequantizations per step.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

WeightFn = Callable[[torch.dtype], torch.Tensor]


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_fn: WeightFn, bias: Optional[torch.Tensor],
                lora_a: Optional[torch.Tensor], lora_b: Optional[torch.Tensor], scale: float,
                dropout_p: float, save_weight: bool) -> torch.Tensor:
        dtype = x.dtype
        w = weight_fn(dtype)
        x2 = x.reshape(-1, x.shape[-1])
        y = x2 @ w.t() if bias is None else torch.addmm(bias.to(dtype), x2, w.t())
        has_lora = lora_a is not None
        mask = None
        xa = xd = a = b = None
        if has_lora:
            # A and B arrive in their storage dtype (fp32); cast here rather than in the caller:
            # two fewer autograd nodes per layer, and the grads go back in the storage dtype.
            ctx.ab_dtype = lora_a.dtype
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            xd = x2
            if dropout_p > 0.0:
                mask = torch.empty_like(x2, dtype=torch.bool).bernoulli_(1.0 - dropout_p)
                xd = x2 * mask / (1.0 - dropout_p)
            xa = xd @ a.t()
            # Out of place: selective activation checkpointing caches `y`'s producer and
            # refuses a later in-place mutation of a cached tensor.
            y = torch.addmm(y, xa, b.t(), alpha=scale)
        ctx.weight_fn = weight_fn
        ctx.scale = scale
        ctx.dropout_p = dropout_p
        ctx.has_lora = has_lora
        ctx.x_shape = x.shape
        ctx.save_for_backward(xd, xa, mask, a, b, w if save_weight else None)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        xd, xa, mask, lora_a, lora_b, w = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        if w is None:
            w = ctx.weight_fn(g.dtype)
        need_x = ctx.needs_input_grad[0]
        dx = g @ w if need_x else None
        da = db = None
        if ctx.has_lora:
            gb = g @ lora_b  # (M, r)
            if need_x:
                if mask is None:
                    dx.addmm_(gb, lora_a, alpha=ctx.scale)
                else:
                    dx.add_((gb @ lora_a) * mask, alpha=ctx.scale / (1.0 - ctx.dropout_p))
            if ctx.needs_input_grad[3]:
                da = (gb.t() @ xd).mul_(ctx.scale).to(ctx.ab_dtype)
            if ctx.needs_input_grad[4]:
                db = (g.t() @ xa).mul_(ctx.scale).to(ctx.ab_dtype)
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return dx, None, None, da, db, None, None, None


def lora_linear(x: torch.Tensor, weight_fn: WeightFn, bias: Optional[torch.Tensor] = None,
                lora_a: Optional[torch.Tensor] = None, lora_b: Optional[torch.Tensor] = None,
                scale: float = 1.0, dropout_p: float = 0.0, save_weight: bool = False) -> torch.Tensor:
    """Apply the frozen base (given as a function dtype → dense W) plus the LoRA branch.

    `x` and `bias` must be in the compute dtype; A and B may be in any float dtype (fp32 master
    weights): they are cast to x's dtype inside, and their gradients come back in their own dtype.
    """
    return LoRALinearFunction.apply(x, weight_fn, bias, lora_a, lora_b, scale, dropout_p, save_weight)


def lora_linear_dense_reference(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor],
                                lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """The textbook form, differentiable by autograd: x·(W + s·B·A)ᵀ + b. Tests compare to it."""
    merged = w + scale * (lora_b @ lora_a)
    return torch.nn.functional.linear(x, merged, bias)
