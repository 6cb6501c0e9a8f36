"""LM loss as a token *sum*, so accumulation and data parallelism weight every token equally.

Decoder-only (causal) models: logits[t] predict labels[t + 1]. Encoder-decoder models (a batch
with `decoder_input_ids`, see data.collate_seq2seq): the decoder reads the labels shifted right,
so logits[t] predict labels[t], unshifted. `batch_loss_sum` / `batch_trained_tokens` pick the
right one from the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.peft.sequence import model_logits

IGNORE_INDEX = -100


def count_trained_tokens(labels: torch.Tensor, encoder_decoder: bool = False) -> int:
    """Tokens that contribute to the loss, ignoring IGNORE_INDEX: labels shifted by one for a causal
    model, all of them for an encoder-decoder model."""
    trained = labels if encoder_decoder else labels[:, 1:]
    return int((trained != IGNORE_INDEX).sum())


def is_seq2seq_batch(batch: dict[str, torch.Tensor]) -> bool:
    return "decoder_input_ids" in batch


def batch_trained_tokens(batch: dict[str, torch.Tensor]) -> int:
    """`count_trained_tokens` of a collated batch, for the architecture it was collated for."""
    return count_trained_tokens(batch["labels"], encoder_decoder=is_seq2seq_batch(batch))


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool]:
    """The keyword arguments a collated batch is run with.

    A batch with `position_ids` (packed rows, or a padding-free flat row) goes in with them and
    WITHOUT an attention mask: that is what makes transformers build a block-diagonal mask from
    the position ids (flash-attention: varlen), so rows never attend to each other. Any padding
    in such a batch trails its row as its own segment, invisible to the real tokens.
    """
    kwargs: dict[str, torch.Tensor | bool] = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    else:
        kwargs["attention_mask"] = batch["attention_mask"]
    if is_seq2seq_batch(batch):
        kwargs["decoder_input_ids"] = batch["decoder_input_ids"]
    return kwargs


def batch_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for a collated batch: the causal LM's over input_ids, or the decoder's; through
    the method hook, so prompt/prefix tuning see every training and eval batch (one row per real token)."""
    return model_logits(model, model_inputs(batch))


def batch_loss_sum(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The token-sum loss of `logits` (from `batch_logits`) against the batch's labels."""
    if is_seq2seq_batch(batch):
        return seq2seq_lm_loss_sum(logits, batch["labels"])
    return causal_lm_loss_sum(logits, batch["labels"])


def causal_lm_loss_sum_fused(model: nn.Module, batch: dict[str, torch.Tensor], backend: str) -> torch.Tensor:
    """Same value and gradients as `causal_lm_loss_sum(model(...).logits, labels)`, without ever
    materializing the [tokens x vocab] logits (chunked fused linear + cross-entropy)."""
    from qtrain_kernels.fused_ce import fused_linear_cross_entropy

    hidden = model.get_decoder()(**model_inputs(batch)).last_hidden_state
    labels = batch["labels"]
    return fused_linear_cross_entropy(hidden[:, :-1], model.get_output_embeddings().weight, labels[:, 1:],
                                      IGNORE_INDEX, backend=backend)


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], fused_backend: Optional[str],
             autocast: Callable[[], Any] = contextlib.nullcontext, forward_model: Optional[nn.Module] = None
             ) -> torch.Tensor:
    """The batch's token-sum loss as the trainer computes it: the fused linear + cross-entropy on
    `fused_backend` for a causal-LM batch (see train.setup.fused_ce_backend), else the logits of
    `forward_model` (an engine's wrapper; default `model`) and cross-entropy. `autocast()` wraps
    the forward (and the fused loss, which runs the lm_head)."""
    if fused_backend is not None and not is_seq2seq_batch(batch):
        with autocast():
            return causal_lm_loss_sum_fused(model, batch, fused_backend)
    with autocast():
        logits = batch_logits(forward_model or model, batch)
    return batch_loss_sum(logits, batch)


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy in fp32 over positions whose label is not ignored: the
    aligned loss below once position t is paired with label t + 1."""
    return seq2seq_lm_loss_sum(logits[:, :-1, :], labels[:, 1:])


def seq2seq_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy in fp32 of logits against their own (unshifted) labels, ignoring -100."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def nll_sum(chunks: Iterable[Sequence[Any]], to_batch: Callable[[Sequence[Any]], dict[str, torch.Tensor]],
            loss_sum: Callable[[dict[str, torch.Tensor]], torch.Tensor],
            stop: Callable[[], bool] = lambda: False) -> Optional[tuple[float, int]]:
    """(summed NLL, trained tokens) over the batches of `chunks`; None if `stop()` turns true first.

    Each chunk becomes a device batch through `to_batch`; `loss_sum(batch)` is its token-sum loss
    and `batch_trained_tokens` counts the tokens it is over, for the batch's architecture.
    """
    total, count = 0.0, 0
    for chunk in chunks:
        if stop():
            return None
        batch = to_batch(chunk)
        total += float(loss_sum(batch))
        count += batch_trained_tokens(batch)
    return total, count
