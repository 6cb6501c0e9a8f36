"""Before training on packed or padding-free batches: decide the layout and prove rows stay isolated.

Packed rows are isolated only if the model builds its attention mask from position ids when no
mask is given (transformers' `masking_utils` does, for sdpa/eager; flash-attention's varlen path
does too). A model that ignores them (custom code, an older architecture) would let every row
attend to the rows before it and train on leaked context without any error, so a tiny packed
input is run through the real model first and must give the same logits as its rows alone.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from qtrain.data import DataBundle
from qtrain.errors import ConfigError, ModelError
from qtrain.models.arch import model_is_encoder_decoder
from qtrain.peft.sequence import PACKED_REFUSAL, sequence_adapter


def flat_batches(padding_free: str | bool, model: nn.Module) -> bool:
    """Whether micro-batches are flattened into one padding-free row (`data.padding_free`: auto, true, false).

    A model with a sequence adapter (prompt/prefix tuning) pads under `auto`: its virtual positions
    go before every row, which one flat row cannot hold (`true` is then a ConfigError)."""
    if model_is_encoder_decoder(model) or padding_free is False:
        return False
    if sequence_adapter(model) is not None:
        if padding_free is True:
            raise ConfigError(f"data.padding_free: true, but {PACKED_REFUSAL}")
        return False
    if padding_free is True:
        return True
    return attention_is_per_row(getattr(model.config, "_attn_implementation", None))


def attention_is_per_row(implementation: str | None) -> bool:
    """Whether packed rows cost attention per row: flash-attention runs its varlen kernel, flex
    attention skips the masked blocks. sdpa/eager compute the whole [total x total] score matrix of
    a flattened micro-batch, up to micro_batch_size times the work of padded rows: `auto` pads there."""
    from transformers.utils.generic import is_flash_attention_requested

    return implementation == "flex_attention" or is_flash_attention_requested(
        requested_attention_implementation=implementation)


def configure_batches(data: DataBundle, padding_free: str | bool, model: nn.Module, device: torch.device,
                      autocast_dtype: Optional[torch.dtype], forward: Optional[nn.Module] = None) -> None:
    """Set `data.flat`, and check packed attention on `model` when batches will rely on it.

    `forward` is what runs the model (default `model`): a sharding engine's wrapper, which gathers
    the weights each rank holds a share of; every rank must then call this together.

    Raises:
        ModelError: the model lets packed rows attend to each other.
    """
    data.flat = flat_batches(padding_free, model)
    if data.flat or data.packed:
        check_packed_attention(model, device, autocast_dtype, forward)


@torch.no_grad()
def check_packed_attention(model: nn.Module, device: torch.device, autocast_dtype: Optional[torch.dtype],
                           forward: Optional[nn.Module] = None) -> None:
    """Raise ModelError unless two rows packed in one sequence give the logits of each row alone."""
    forward = model if forward is None else forward
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(vocab, (n,), generator=generator).to(device) for n in (5, 3)]
    positions = torch.cat([torch.arange(len(r)) for r in rows]).to(device)
    was_training = forward.training
    forward.eval()
    amp = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    try:
        with amp:
            alone = torch.cat([forward(input_ids=r[None], use_cache=False).logits[0].float() for r in rows])
            packed = forward(input_ids=torch.cat(rows)[None], position_ids=positions[None],
                           use_cache=False).logits[0].float()
    finally:
        forward.train(was_training)
    # Rounding differs between the two masks (a few ulps of the compute dtype); a leak changes
    # the second row's logits at the scale of the logits themselves.
    low_precision = autocast_dtype is not None or model.get_input_embeddings().weight.dtype != torch.float32
    tolerance = (3e-2 if low_precision else 1e-3) * max(1.0, float(alone.abs().max()))
    error = float((packed - alone).abs().max())
    if not error <= tolerance:
        raise ModelError(f"{type(model).__name__} lets packed rows attend to each other (logits of a row packed after "
                         f"another differ from the row alone by {error:.3g}); this model does not build its "
                         "attention mask from position ids. Set data.packing: false and data.padding_free: off")
