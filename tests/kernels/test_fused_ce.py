"""Chunked fused linear + cross-entropy: the Triton row kernel against its reference, and the whole
op (both backends) against textbook autograd over full logits.

Row kernel bound, per row, with V the vocabulary, span = max(x) − min(x) over the row and
lse its log-sum-exp: both sides sum V float32 exponentials whose arguments x − m carry a rounding
of at most u32·span, so |Δlse| ≤ eps = 2·(V + 2·span + 8)·u32·(1 + |lse|); the loss moves by at
most eps, each softmax entry p by at most eps·p, and the stored gradient adds one rounding to the
logits' dtype on each side (2·u_out·|grad|).
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import DEVICE, U32, UNIT_ROUNDOFF, abs64, assert_bounded, randn

from qtrain_kernels.fused_ce import cross_entropy_rows_reference, fused_ce_reference, fused_linear_cross_entropy
from qtrain_kernels.triton.fused_ce import cross_entropy_rows

IGNORE = -100


def _labels(rows: int, vocab: int, seed: int) -> torch.Tensor:
    y = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(seed))
    y[3::4] = IGNORE  # masked prompt tokens
    y[0] = vocab - 1  # the last column (the kernel's tail block)
    y[1:2] = 0
    return y.to(DEVICE)


def _row_eps(logits: torch.Tensor) -> torch.Tensor:
    x = logits.double().cpu()
    lse = torch.logsumexp(x, dim=1)
    span = x.amax(dim=1) - x.amin(dim=1)
    return 2 * (x.shape[1] + 2 * span + 8) * U32 * (1 + lse.abs())


@pytest.mark.parametrize("rows,vocab", [(1, 300), (37, 300), (9, 1500)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_kernel_matches_reference(rows, vocab, dtype):
    logits = randn(rows, vocab, dtype=dtype, device=DEVICE, seed=rows, scale=3.0)
    labels = _labels(rows, vocab, seed=vocab)
    ours, theirs = logits.clone(), logits.clone()
    loss = cross_entropy_rows(ours, labels, IGNORE)
    ref = cross_entropy_rows_reference(theirs, labels, IGNORE)
    eps = _row_eps(logits)
    assert_bounded(loss, ref, eps, 1.0)
    p = torch.softmax(logits.double().cpu(), dim=1)
    grad_mag = eps[:, None] * p / (2 * UNIT_ROUNDOFF[dtype]) + abs64(theirs)
    assert_bounded(ours, theirs, grad_mag, 2 * UNIT_ROUNDOFF[dtype])
    ignored = (labels == IGNORE).cpu()
    assert torch.all(loss.cpu()[ignored] == 0) and torch.all(ours.cpu()[ignored] == 0)


def _textbook(hidden, weight, labels):
    """Full logits, float32 cross-entropy, autograd: what the fused op replaces."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    logits = h @ w.t()
    loss = F.cross_entropy(logits.float().reshape(-1, w.shape[0]), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    loss.backward()
    return loss.detach(), h.grad, w.grad, logits.detach()


@pytest.mark.parametrize("backend", ["triton", "torch", "fused_ce_reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("chunk_size", [7, None])
def test_fused_linear_ce_matches_textbook(backend, dtype, chunk_size):
    """Bound: rel = 2·(V + H + 8)·u32 + (2 + 4·L)·u_out over magnitudes (P + |P − Y|)·|W| (dh) and
    (P + |P − Y|)ᵀ·|h| (dW): the lm_head sums (depth H, then V) as in kernel_checks, plus logits
    that the chunked and the full GEMM may round differently (by u_out·L, L = max|logit|), which
    moves each p by at most 2·u_out·L·p."""
    b, t, hdim, vocab = 2, 19, 40, 300
    hidden = randn(b, t, hdim, dtype=dtype, device=DEVICE, seed=1)
    weight = randn(vocab, hdim, dtype=dtype, device=DEVICE, seed=2, scale=0.3).requires_grad_(True)
    labels = _labels(b * t, vocab, seed=3).view(b, t)
    if backend == "fused_ce_reference":
        loss, dh, dw = fused_ce_reference(hidden, weight.detach(), labels, IGNORE, chunk_size)
    else:
        h = hidden.clone().requires_grad_(True)
        loss = fused_linear_cross_entropy(h, weight, labels, IGNORE, chunk_size=chunk_size, backend=backend)
        loss.backward()
        dh, dw = h.grad, weight.grad
    ref_loss, ref_dh, ref_dw, logits = _textbook(hidden, weight, labels)

    u_out = UNIT_ROUNDOFF[dtype]
    big_l = float(logits.abs().max())
    rel = 2 * (vocab + hdim + 8) * U32 + (2 + 4 * big_l) * u_out
    x = logits.double().cpu().reshape(-1, vocab)
    p = torch.softmax(x, dim=1)
    y = torch.zeros_like(p)
    keep = (labels.reshape(-1) != IGNORE).cpu()
    y[keep, labels.reshape(-1).cpu()[keep]] = 1.0
    coef = (p + (p - y).abs()) * keep[:, None]
    assert loss.dtype == torch.float32
    loss_mag = ((1 + torch.logsumexp(x, 1).abs() + big_l) * keep).sum()
    assert abs(float(loss.detach()) - float(ref_loss)) <= rel * float(loss_mag)
    assert_bounded(dh, ref_dh, (coef @ abs64(weight)).view(b, t, hdim), rel)
    assert_bounded(dw, ref_dw, coef.t() @ abs64(hidden).reshape(-1, hdim), rel)


def test_grad_scales_with_upstream_and_frozen_head_gets_none():
    """Backward only scales the gradients computed in forward (exactly: 0.25 is a power of two)."""
    base = randn(3, 5, 16, dtype=torch.float32, device=DEVICE, seed=4)
    weight = randn(50, 16, dtype=torch.float32, device=DEVICE, seed=5)
    labels = _labels(15, 50, seed=6).view(3, 5)
    grads = []
    for factor in (1.0, 0.25):
        hidden = base.clone().requires_grad_(True)
        (factor * fused_linear_cross_entropy(hidden, weight, labels, backend="triton")).backward()
        grads.append(hidden.grad)
    assert torch.equal(grads[1], 0.25 * grads[0])
    assert weight.grad is None


def test_all_ignored_gives_zero_and_no_grad_mode_works():
    hidden = randn(2, 4, 8, dtype=torch.float32, device=DEVICE, seed=7).requires_grad_(True)
    weight = randn(20, 8, dtype=torch.float32, device=DEVICE, seed=8)
    labels = torch.full((2, 4), IGNORE, device=DEVICE)
    loss = fused_linear_cross_entropy(hidden, weight, labels, backend="triton")
    loss.backward()
    assert float(loss) == 0.0 and torch.all(hidden.grad == 0)
    with torch.no_grad():
        ok = fused_linear_cross_entropy(hidden, weight, _labels(8, 20, 9).view(2, 4), backend="triton")
    assert ok.requires_grad is False and float(ok) > 0
    with pytest.raises(ValueError, match="do not match"):
        fused_linear_cross_entropy(hidden, weight, labels[:, :3])
