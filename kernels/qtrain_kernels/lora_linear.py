"""LoRA linear over a frozen (possibly 4-bit) base: the single dispatch point of the hot path.

    y  = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ          W frozen, A (r×K) and B (N×r) trained
    dx = dy·W + s·((dy·B)·A) ⊙ mask/(1-p)
    dA = s·(dy·B)ᵀ·drop(x)        dB = s·dyᵀ·(drop(x)·Aᵀ)

Two paths, chosen per call:
- torch (any backend, any device): W comes from `weight_fn` (dense, dequantized on demand) and
  the products are torch GEMMs; `lora_forward_reference` / `lora_backward_dx_reference` are this
  path written against NF4 buffers, the oracles of the fused kernels;
- triton (backend "triton", NF4 base given as `nf4`, tensors the kernels can run on): y and dx
  come from the fused kernels in `qtrain_kernels.triton`, which dequantize W tile by tile inside
  the GEMM and add the low-rank term in its epilogue; W is never materialized. M ≤ 16 rows
  (generation) take the split-K GEMV. dA and dB stay torch mms on the small saved tensors.
Dropout draws its mask with torch's RNG on both paths (the same mask for the same seed) and
saves it for backward.

On the torch path a layer with LoRA is two autograd Functions: `LowRankTerm` (the dropout and
the low-rank term, and in backward every gradient of the layer, the base's g·W included) and
`BaseProduct` (adds x·Wᵀ, saves nothing, passes g through). Non-reentrant gradient checkpointing
stops recomputing once the last tensor backward needs is saved again, so a base product whose
output nothing downstream saves (a Llama layer's down_proj, which only feeds the residual add)
is never recomputed: one of a layer's three big GEMMs in every recomputed step. The fused path
and a base without LoRA stay one Function (`LoRALinearFunction`).

W is never kept between forward and backward: backward dequantizes it again. The exception is
`save_weight=True` on the torch path, meant for gradient checkpointing: there the first forward's
saved tensors are dropped by the checkpoint and the recomputed forward runs right before this
layer's backward, so keeping its W for that backward costs one layer's weights for a moment and
saves one of the three dequantizations per step. The fused path needs no W at all.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Optional

import torch

from qtrain_kernels import dispatch
from qtrain_kernels.dispatch import NF4Buffers

WeightFn = Callable[[torch.dtype], torch.Tensor]
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


_LOW_RANK = contextvars.ContextVar("qtrain_low_rank_product", default=False)


@contextlib.contextmanager
def low_rank_product() -> Iterator[None]:
    """Marks the ops of an adapter's low-rank branch: cheap to redo, so a selective-recompute
    policy (qtrain.peft.recompute) never keeps their outputs, only the base product's."""
    token = _LOW_RANK.set(True)
    try:
        yield
    finally:
        _LOW_RANK.reset(token)


def in_low_rank_product() -> bool:
    return _LOW_RANK.get()


def dense_forward(x2: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], xa: Optional[torch.Tensor],
                  b: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """The torch path's forward for 2-D x: x·wᵀ (+ bias) (+ scale·xa·bᵀ).

    The base product is the last op and produces y itself: a recompute policy that keeps it
    keeps one [M, N] tensor per layer (the low-rank term, computed first, is recomputed).
    """
    if xa is None:
        return x2 @ w.t() if bias is None else torch.addmm(bias.to(x2.dtype), x2, w.t())
    with low_rank_product():
        if bias is None:
            low, beta = xa @ b.t(), scale
        else:
            low, beta = torch.addmm(bias.to(x2.dtype), xa, b.t(), alpha=scale), 1.0
    return torch.addmm(low, x2, w.t(), beta=beta)


def dense_backward_dx(g: torch.Tensor, w: torch.Tensor, gb: Optional[torch.Tensor], a: Optional[torch.Tensor],
                      scale: float, mask: Optional[torch.Tensor], dropout_p: float) -> torch.Tensor:
    """The torch path's input gradient: g·w (+ scale·(gb·a) ⊙ mask/(1-p))."""
    dx = g @ w
    if gb is not None:
        if mask is None:
            dx.addmm_(gb, a, alpha=scale)
        else:
            dx.add_((gb @ a) * mask, alpha=scale / (1.0 - dropout_p))
    return dx


def low_rank_grads(g: torch.Tensor, gb: torch.Tensor, xd: torch.Tensor, xa: torch.Tensor, scale: float,
                   dtype: torch.dtype, need_a: bool, need_b: bool):
    """(dA, dB) in A's and B's storage `dtype`, each None when not needed: dA = s·(g·B)ᵀ·drop(x),
    dB = s·gᵀ·(drop(x)·Aᵀ), from gb = g·B."""
    da = (gb.t() @ xd).mul_(scale).to(dtype) if need_a else None
    db = (g.t() @ xa).mul_(scale).to(dtype) if need_b else None
    return da, db


def lora_forward_reference(x: torch.Tensor, nf4: NF4Buffers, bias: Optional[torch.Tensor],
                           xa: Optional[torch.Tensor], b: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Oracle of `triton.lora_matmul.lora_forward` and `triton.gemv_nf4.nf4_gemv` (same signature)."""
    return dense_forward(x, dispatch.dequantize_buffers_reference(nf4, x.dtype), bias, xa, b, scale)


def lora_backward_dx_reference(g: torch.Tensor, nf4: NF4Buffers, gb: Optional[torch.Tensor],
                               a: Optional[torch.Tensor], scale: float, mask: Optional[torch.Tensor],
                               dropout_p: float) -> torch.Tensor:
    """Oracle of `triton.lora_matmul.lora_backward_dx` (same signature)."""
    return dense_backward_dx(g, dispatch.dequantize_buffers_reference(nf4, g.dtype), gb, a, scale, mask, dropout_p)


def dropped(x2: torch.Tensor, dropout_p: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(dropout(x2), its keep-mask or None): the mask is drawn from torch's RNG and kept for backward."""
    if dropout_p <= 0.0:
        return x2, None
    mask = torch.empty_like(x2, dtype=torch.bool).bernoulli_(1.0 - dropout_p)
    return x2 * mask / (1.0 - dropout_p), mask


def _fused(backend: str, x2: torch.Tensor, nf4: Optional[NF4Buffers]) -> bool:
    """Whether this call takes the fused Triton path (else the torch path, always correct)."""
    if nf4 is None or x2.dtype not in FUSED_DTYPES or x2.device != nf4.packed.device:
        return False
    if not dispatch.use_triton(backend, x2):
        return False
    from qtrain_kernels.triton.lora_matmul import supports

    return supports(nf4)


def _fused_forward(x2: torch.Tensor, nf4: NF4Buffers, bias, xa, b, scale: float) -> torch.Tensor:
    from qtrain_kernels.triton import gemv_nf4, lora_matmul

    bias = None if bias is None else bias.to(x2.dtype)
    if x2.shape[0] <= gemv_nf4.MAX_M:
        return gemv_nf4.nf4_gemv(x2, nf4, bias, xa, b, scale)
    return lora_matmul.lora_forward(x2, nf4, bias, xa, b, scale)


class LoRALinearFunction(torch.autograd.Function):
    """The whole layer as one Function: the fused path (with or without LoRA) and a base without LoRA."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_fn: WeightFn, bias: Optional[torch.Tensor],
                lora_a: Optional[torch.Tensor], lora_b: Optional[torch.Tensor], scale: float,
                dropout_p: float, save_weight: bool, nf4: Optional[NF4Buffers] = None,
                backend: str = "torch") -> torch.Tensor:
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        fused = _fused(backend, x2, nf4)
        has_lora = lora_a is not None
        mask = xa = xd = a = b = None
        if has_lora:
            # A and B arrive in their storage dtype (fp32); cast here rather than in the caller:
            # two fewer autograd nodes per layer, and the grads go back in the storage dtype.
            ctx.ab_dtype = lora_a.dtype
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            with low_rank_product():
                xd, mask = dropped(x2, dropout_p)
                xa = xd @ a.t()
        w = None
        if fused:
            y = _fused_forward(x2, nf4, bias, xa, b, scale)
        else:
            w = weight_fn(dtype)
            y = dense_forward(x2, w, bias, xa, b, scale)
        ctx.weight_fn = weight_fn
        ctx.nf4 = nf4 if fused else None
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
        need_x = ctx.needs_input_grad[0]
        gb = g @ lora_b if ctx.has_lora else None  # (M, r)
        dx = da = db = None
        if need_x:
            if ctx.nf4 is not None:
                from qtrain_kernels.triton.lora_matmul import lora_backward_dx

                dx = lora_backward_dx(g, ctx.nf4, gb, lora_a, ctx.scale, mask, ctx.dropout_p)
            else:
                w = ctx.weight_fn(g.dtype) if w is None else w
                dx = dense_backward_dx(g, w, gb, lora_a, ctx.scale, mask, ctx.dropout_p)
            dx = dx.view(ctx.x_shape)
        if ctx.has_lora:
            da, db = low_rank_grads(g, gb, xd, xa, ctx.scale, ctx.ab_dtype, ctx.needs_input_grad[3],
                                    ctx.needs_input_grad[4])
        return dx, None, None, da, db, None, None, None, None, None


class LowRankTerm(torch.autograd.Function):
    """low = s·(drop(x)·Aᵀ)·Bᵀ (+ bias) on the torch path; its backward, given g = dL/dy of the whole
    layer y = low + x·Wᵀ (which `BaseProduct` passes through unchanged), returns the layer's dx, dA, dB."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, w: torch.Tensor, weight_fn: WeightFn, bias: Optional[torch.Tensor],
                lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, dropout_p: float,
                save_weight: bool) -> torch.Tensor:
        ctx.ab_dtype = lora_a.dtype
        a, b = lora_a.to(x2.dtype), lora_b.to(x2.dtype)
        with low_rank_product():
            xd, mask = dropped(x2, dropout_p)
            xa = xd @ a.t()
            low = (xa * scale) @ b.t() if bias is None else torch.addmm(bias.to(x2.dtype), xa, b.t(), alpha=scale)
        ctx.weight_fn, ctx.scale, ctx.dropout_p = weight_fn, scale, dropout_p
        ctx.save_for_backward(xd, xa, mask, a, b, w if save_weight else None)
        return low

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        xd, xa, mask, a, b, w = ctx.saved_tensors
        gb = g @ b
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dense_backward_dx(g, ctx.weight_fn(g.dtype) if w is None else w, gb, a, ctx.scale, mask,
                                   ctx.dropout_p)
        da, db = low_rank_grads(g, gb, xd, xa, ctx.scale, ctx.ab_dtype, ctx.needs_input_grad[4],
                                ctx.needs_input_grad[5])
        return dx, None, None, None, da, db, None, None, None


class BaseProduct(torch.autograd.Function):
    """y = low + x·Wᵀ. Saves nothing, so checkpointing's recompute never has to reach it for a saved
    tensor; x's gradient (g·W and the low-rank part) comes from `LowRankTerm`, which gets g as is."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, low: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.addmm(low, x2, w.t())

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return None, g, None


def lora_linear(x: torch.Tensor, weight_fn: WeightFn, bias: Optional[torch.Tensor] = None,
                lora_a: Optional[torch.Tensor] = None, lora_b: Optional[torch.Tensor] = None,
                scale: float = 1.0, dropout_p: float = 0.0, save_weight: bool = False, *,
                nf4: Optional[NF4Buffers] = None, backend: str = "torch") -> torch.Tensor:
    """Apply the frozen base (given as a function dtype → dense W) plus the LoRA branch.

    `x` and `bias` must be in the compute dtype; A and B may be in any float dtype (fp32 master
    weights): they are cast to x's dtype inside, and their gradients come back in their own dtype.
    With `backend="triton"` and the base's NF4 buffers as `nf4`, the fused kernels run where they
    can (CUDA tensors, or CPU under TRITON_INTERPRET=1); `weight_fn` stays the fallback.
    """
    x2 = x.reshape(-1, x.shape[-1])
    if lora_a is None or _fused(backend, x2, nf4):
        return LoRALinearFunction.apply(x, weight_fn, bias, lora_a, lora_b, scale, dropout_p, save_weight, nf4,
                                        backend)
    w = weight_fn(x.dtype)
    low = LowRankTerm.apply(x2, w, weight_fn, bias, lora_a, lora_b, scale, dropout_p, save_weight)
    return BaseProduct.apply(x2, low, w).view(*x.shape[:-1], w.shape[0])


def lora_linear_dense_reference(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor],
                                lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """The textbook form, differentiable by autograd: x·(W + s·B·A)ᵀ + b. Tests compare to it."""
    merged = w + scale * (lora_b @ lora_a)
    return torch.nn.functional.linear(x, merged, bias)
