"""Chunked fused linear + cross-entropy for the LM head: the loss *sum* without the logits tensor.

    loss = Σ_t [label_t ≠ ignore] (logsumexp(h_t·Wᵀ) − (h_t·Wᵀ)[label_t])

For a Llama-3 vocabulary (128k) a 4k-token micro-batch has 0.5 G logits: 1 GiB in bf16, 2 GiB
more for the float32 copy the usual `cross_entropy(logits.float())` makes, and the same again for
its gradient. Here the rows are processed `chunk_size` at a time: logits of one chunk (compute
dtype) → per-row loss, with the chunk overwritten in place by its gradient (softmax − onehot) →
dH_chunk = dlogits·W and dW += dlogitsᵀ·H_chunk. The gradients are computed in the forward (the
loss is a sum, so backward only scales them by the incoming scalar); peak extra memory is one
chunk of logits plus dH.

Rows whose label is ignored are dropped before any matmul: with prompt masking (instruction and
chat data) that skips their share of the lm_head GEMMs too. The row-wise loss/gradient step is
the Triton kernel on the triton backend and `cross_entropy_rows_reference` otherwise.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from qtrain_kernels import dispatch

RowsFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
LOGITS_PER_CHUNK = 1 << 27  # default chunk: 128 Mi logits, 256 MiB in bf16 (~1k rows of a 128k vocab)


def cross_entropy_rows_reference(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-row loss (float32) of 2-D `logits`, which are overwritten with d(sum of losses)/d logits.

    Math in float32, one chunk at a time (the caller's chunk bounds the float32 copy).
    """
    x = logits.float()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)
    lse = torch.logsumexp(x, dim=1, keepdim=True)
    loss = (lse - x.gather(1, safe)).squeeze(1)
    grad = x.sub_(lse).exp_()  # in place: the chunk itself when it is float32 already
    grad.scatter_(1, safe, grad.gather(1, safe) - 1.0)  # gather/scatter_: deterministic on CUDA too
    grad.mul_(valid.unsqueeze(1))
    if grad is not logits:
        logits.copy_(grad)
    return torch.where(valid, loss, torch.zeros_like(loss))


def _rows_fn(backend: str, t: torch.Tensor) -> RowsFn:
    if dispatch.use_triton(backend, t):
        from qtrain_kernels.triton.fused_ce import cross_entropy_rows

        return cross_entropy_rows
    return cross_entropy_rows_reference


def _chunk_rows(chunk_size: Optional[int], vocab: int) -> int:
    return chunk_size if chunk_size else max(1, LOGITS_PER_CHUNK // max(1, vocab))


def _loss_and_grads(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, ignore_index: int, chunk: int,
                    rows_fn: RowsFn, need_h: bool, need_w: bool):
    """(float32 loss sum, dloss/dh or None, dloss/dw or None) for 2-D h (T×H), w (V×H), y (T,)."""
    keep = (y != ignore_index).nonzero().squeeze(1)
    all_kept = keep.numel() == y.numel()
    hk = h if all_kept else h.index_select(0, keep)
    yk = y if all_kept else y.index_select(0, keep)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_hk = torch.empty_like(hk) if need_h else None
    # dW accumulates over chunks in W's dtype; one rounding per chunk (addmm sums in float32).
    grad_w = torch.zeros_like(w) if need_w else None
    for start in range(0, hk.shape[0], chunk):
        hc, yc = hk[start:start + chunk], yk[start:start + chunk]
        logits = hc @ w.t()
        loss += rows_fn(logits, yc, ignore_index).sum()
        if need_h:
            torch.mm(logits, w, out=grad_hk[start:start + chunk])
        if need_w:
            grad_w.addmm_(logits.t(), hc)
    grad_h = grad_hk
    if need_h and not all_kept:
        grad_h = torch.zeros_like(h).index_put_((keep,), grad_hk)  # unique rows: deterministic
    return loss, grad_h, grad_w


def fused_ce_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                       chunk_size: Optional[int] = None):
    """Pure-torch oracle: (loss sum, d/d hidden, d/d weight), logits materialized one chunk at a time."""
    h = hidden.reshape(-1, hidden.shape[-1])
    loss, gh, gw = _loss_and_grads(h, weight.to(h.dtype), labels.reshape(-1), ignore_index,
                                   _chunk_rows(chunk_size, weight.shape[0]), cross_entropy_rows_reference,
                                   True, True)
    return loss, gh.view(hidden.shape), gw


class FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                chunk_size: Optional[int], backend: str) -> torch.Tensor:
        h = hidden.reshape(-1, hidden.shape[-1])
        w = weight if weight.dtype == h.dtype else weight.to(h.dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, gh, gw = _loss_and_grads(h, w, labels.reshape(-1), ignore_index, _chunk_rows(chunk_size, w.shape[0]),
                                       _rows_fn(backend, h), need_h, need_w)
        ctx.hidden_shape = hidden.shape
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(gh, gw)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        gh, gw = ctx.saved_tensors
        dh = None if gh is None else (gh * grad_loss.to(gh.dtype)).view(ctx.hidden_shape)
        dw = None if gw is None else (gw * grad_loss.to(gw.dtype)).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int = -100, chunk_size: Optional[int] = None,
                               backend: str = "torch") -> torch.Tensor:
    """Sum over tokens of CE(hidden·Wᵀ, labels) as a float32 scalar, differentiable in hidden and W.

    `hidden` (..., H) and `labels` (...) must already be aligned (for a causal LM: hidden[:, :-1]
    with labels[:, 1:]). The logits are computed in hidden's dtype (W is cast to it if needed).
    `backend` is a `dispatch.resolve` name; "triton" runs the row kernel where the tensors allow.
    """
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"fused_linear_cross_entropy: labels {tuple(labels.shape)} do not match hidden "
                         f"{tuple(hidden.shape)} without its last dimension")
    return FusedLinearCrossEntropy.apply(hidden, lm_head_weight, labels, ignore_index, chunk_size, backend)
