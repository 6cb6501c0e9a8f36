"""Row-wise cross-entropy over a chunk of logits that overwrites the chunk with its gradient.

One program per row: an online max/sum-exp pass over the vocabulary in float32 (one read), then
a second read that writes softmax − onehot back in the logits' dtype. The caller
(`qtrain_kernels.fused_ce`) runs the lm_head matmul chunk by chunk around it, so no full
(tokens × vocab) logits tensor, and no float32 copy of one, ever exists.

Rows whose label is `ignore_index` get loss 0 and a zero gradient row (branch-free: the work is
done and masked; the caller drops such rows before the matmul, so they are rare here).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qtrain_kernels.dispatch import interpreting, kernel_device


@triton.jit
def _ce_kernel(logits_ptr, labels_ptr, loss_ptr, V, stride_row, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    safe_label = tl.where(valid, label, 0)
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(base + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(base + safe_label).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
    for v0 in range(0, V, BLOCK_V):
        inside = v0 + cols < V
        x = tl.load(base + v0 + cols, mask=inside, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) - tl.where(v0 + cols == safe_label, 1.0, 0.0)
        grad = tl.where(valid, grad, 0.0)
        tl.store(base + v0 + cols, grad.to(logits_ptr.dtype.element_ty), mask=inside)


def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-row loss (float32) of 2-D `logits`, which are overwritten with d(sum of losses)/d logits.

    Same signature and contract as `qtrain_kernels.fused_ce.cross_entropy_rows_reference`.
    """
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("cross_entropy_rows: logits must be contiguous along the vocabulary")
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss
    # 4096 columns per step: long enough rows to stream (a 128k vocab is 32 steps), few registers.
    block = min(triton.next_power_of_2(vocab), 1024 if interpreting() else 4096)
    with kernel_device(logits):
        _ce_kernel[(rows,)](logits, labels.contiguous(), loss, vocab, logits.stride(0), ignore_index, BLOCK_V=block,
                            num_warps=8 if block >= 4096 else 4, enable_fp_fusion=True)
    return loss
