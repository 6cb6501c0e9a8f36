"""The decoding loop: left-padded batch, one prefill, then one token per step from the KV cache.

Rows are left-padded so every row's last prompt token sits in the last column; position ids
count real tokens only (pads get 0 and are masked out), so a row's positions, and therefore
its logits, are those it would have alone. A row stops at EOS (not included in its output) or
after `max_new_tokens`; the batch stops when every row has.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from qtrain.infer.sampling import SamplingConfig, next_tokens

# on_token(row, token_id): called for every generated token that is kept (not EOS), in order.
TokenCallback = Callable[[int, int], None]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each [batch, longest], prompts flush right."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """The tokenizer's EOS plus any the model's generation config lists."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, (list, tuple)) else ([gen] if gen is not None else []))
    return ids


def model_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


@torch.inference_mode()
def generate_tokens(model: nn.Module, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, eos: set[int],
                    pad_id: int, on_token: Optional[TokenCallback] = None,
                    generator: Optional[torch.Generator] = None) -> list[list[int]]:
    """Generated token ids per prompt (EOS excluded). Adapters apply as set on the model by the caller.

    Sampling draws from `generator` (default: a fresh one seeded with `cfg.seed`); pass one
    generator to several calls to continue a single random stream across batches.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate_tokens needs at least one prompt, each with at least one token")
    device = model_device(model)
    if generator is None and cfg.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    ids, mask = left_pad(prompts, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    last = positions[:, -1:]
    eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated: list[list[int]] = [[] for _ in prompts]
    for step in range(cfg.max_new_tokens):
        tokens = next_tokens(out.logits[:, -1], cfg, generator)
        tokens = torch.where(done, torch.full_like(tokens, pad_id), tokens)
        stopped = torch.isin(tokens, eos_t) & ~done
        keep = ~done & ~stopped
        for row in keep.nonzero().flatten().tolist():
            token = int(tokens[row])
            generated[row].append(token)
            if on_token is not None:
                on_token(row, token)
        done |= stopped
        if bool(done.all()) or step == cfg.max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        last = last + 1
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=last,
                    past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    return generated
