"""Causal-LM loss as a token *sum*, so accumulation and data parallelism weight every token equally."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def count_trained_tokens(labels: torch.Tensor) -> int:
    """Tokens that contribute to the loss: labels shifted by one, ignoring IGNORE_INDEX."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def fused_ce_supported(model: nn.Module) -> bool:
    """The fused linear + cross-entropy replaces `logits = lm_head(hidden)` only for a plain head."""
    head = model.get_output_embeddings()
    cfg = model.config
    scaled = any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    return isinstance(head, nn.Linear) and head.bias is None and not scaled


def causal_lm_loss_sum_fused(model: nn.Module, batch: dict[str, torch.Tensor], backend: str) -> torch.Tensor:
    """Same value and gradients as `causal_lm_loss_sum(model(...).logits, labels)`, without ever
    materializing the [tokens x vocab] logits (chunked fused linear + cross-entropy)."""
    from qtrain_kernels.fused_ce import fused_linear_cross_entropy

    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"]
    return fused_linear_cross_entropy(hidden[:, :-1], model.get_output_embeddings().weight, labels[:, 1:],
                                      IGNORE_INDEX, backend=backend)


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy in fp32 over positions whose label is not ignored."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
