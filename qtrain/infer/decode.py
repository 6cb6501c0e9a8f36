"""The decoding loop: left-padded batch, one prefill, then one token per step from the KV cache.

Rows are left-padded so every row's last prompt token sits in the last column; position ids
count real tokens only (pads get 0 and are masked out), so a row's positions, and therefore
its logits, are those it would have alone. The prefill goes through the method hook
(qtrain.peft.sequence): prompt/prefix tuning prepend virtual positions, which the returned
attention mask covers, so positions and the growing mask include them. A row stops at EOS (not included in its output) or
after `max_new_tokens`; the batch stops when every row has.

Encoder-decoder models (T5 family): the prompts, right-padded and masked, go through the encoder
once; the decoder starts every row from the model's decoder_start_token_id and takes one token
per step from its KV cache. Every row's decoder has the same length, so there is no decoder
padding, and a row's logits are again those it would have alone. Greedy/sampling and stopping
are the same code for both.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from qtrain.infer.sampling import SamplingConfig, next_tokens
from qtrain.models.arch import decoder_start_id, model_is_encoder_decoder
from qtrain.peft.sequence import prepare_call

# on_token(row, token_id): called for every generated token that is kept (not EOS), in order.
TokenCallback = Callable[[int, int], None]
# advance(tokens [batch]) -> the next logits [batch, vocab], after feeding each row its token.
Advance = Callable[[torch.Tensor], torch.Tensor]


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device,
                left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each [batch, longest]; prompts flush right (`left` padding, for a
    decoder that continues them) or flush left (for an encoder)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            cols = slice(width - len(prompt), width) if left else slice(0, len(prompt))
            ids[row, cols] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, cols] = 1
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
    start = _seq2seq_start if model_is_encoder_decoder(model) else _causal_start
    logits, advance = start(model, prompts, pad_id, device)
    return _decode(logits, advance, len(prompts), cfg, eos, pad_id, device, on_token, generator)


def _causal_start(model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int,
                  device: torch.device) -> tuple[torch.Tensor, Advance]:
    """Prefill the left-padded prompts; (last logits, advance) over the growing KV cache."""
    ids, mask = pad_prompts(prompts, pad_id, device, left=True)
    # Through the method hook: prompt/prefix tuning add virtual positions, covered by the mask it returns.
    call, _ = prepare_call(model, {"input_ids": ids, "attention_mask": mask}, generation=True)
    mask = call["attention_mask"]
    fed = call["input_ids"] if "input_ids" in call else call["inputs_embeds"]
    # The mask may also cover positions already in the cache (prefix tuning): positions of the fed ones only.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -fed.shape[1]:]
    out = model(**call, position_ids=positions, use_cache=True, logits_to_keep=1)
    state = {"out": out, "mask": mask, "last": positions[:, -1:]}

    def advance(tokens: torch.Tensor) -> torch.Tensor:
        state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=1)
        state["last"] = state["last"] + 1
        state["out"] = model(input_ids=tokens[:, None], attention_mask=state["mask"], position_ids=state["last"],
                             past_key_values=state["out"].past_key_values, use_cache=True, logits_to_keep=1)
        return state["out"].logits[:, -1]

    return out.logits[:, -1], advance


def _seq2seq_start(model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int,
                   device: torch.device) -> tuple[torch.Tensor, Advance]:
    """Encode the right-padded prompts once; (logits after the decoder start token, advance)."""
    ids, mask = pad_prompts(prompts, pad_id, device, left=False)
    call, _ = prepare_call(model, {"input_ids": ids, "attention_mask": mask}, generation=True)
    mask = call["attention_mask"]
    encoded = model.get_encoder()(**call, return_dict=True)
    state = {"past": None}

    def advance(tokens: torch.Tensor) -> torch.Tensor:
        out = model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=tokens[:, None],
                    past_key_values=state["past"], use_cache=True)
        state["past"] = out.past_key_values
        return out.logits[:, -1]

    first = torch.full((len(prompts),), decoder_start_id(model), dtype=torch.long, device=device)
    return advance(first), advance


def _decode(logits: torch.Tensor, advance: Advance, n_rows: int, cfg: SamplingConfig, eos: set[int], pad_id: int,
            device: torch.device, on_token: Optional[TokenCallback],
            generator: Optional[torch.Generator]) -> list[list[int]]:
    """Choose, keep and stop tokens row by row until every row hit EOS or max_new_tokens."""
    eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=device)
    done = torch.zeros(n_rows, dtype=torch.bool, device=device)
    generated: list[list[int]] = [[] for _ in range(n_rows)]
    for step in range(cfg.max_new_tokens):
        tokens = next_tokens(logits, cfg, generator)
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
        logits = advance(tokens)
    return generated
