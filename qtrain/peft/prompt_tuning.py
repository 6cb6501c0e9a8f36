"""Prompt tuning: k trainable "virtual token" embeddings prepended to the input (Lester et al. 2021).

The model is untouched; every call goes through the sequence hook (qtrain.peft.sequence), which
embeds the input ids, prepends the prompt and extends the attention mask. Decoder-only models see
the prompt at positions 0..k-1 and the real tokens after it (the logits of the virtual positions
are cut off, so losses see one row per real token); T5-family models get the prompt in front of
the encoder input (Lester et al.'s setting) and the decoder is unchanged.

Init (`peft.prompt_init`): `vocab` (default) copies the embeddings of k tokens sampled from the
vocabulary; `text` those of `prompt_init_text`'s tokens, repeated to fill k; `random` draws
N(0, σ²) with σ the embedding matrix's own std (peft's RANDOM draws N(0, 1), far off the scale of
most models' embeddings).

The artifact is peft's PROMPT_TUNING format (`prompt_embeddings` [k, hidden]; for T5
`num_transformer_submodules: 1`, the encoder prompt). It cannot be merged into weights (the
prompt is an input); rows of a batch may each use their own prompt (see qtrain.infer).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qtrain.config.schema import PeftConfig
from qtrain.errors import ConfigError
from qtrain.models.arch import model_is_encoder_decoder
from qtrain.peft.layer import freeze
from qtrain.peft.method import Method, task_type_of
from qtrain.peft.sequence import SequenceAdapter, attach, attach_saved, sequence_adapter

KEY = "prompt_embeddings"


def embed_with_prompts(model: nn.Module, kwargs: dict, prompts: torch.Tensor, mask: torch.Tensor) -> tuple[dict, int]:
    """`kwargs` with input_ids replaced by [prompts; embeddings] and the attention mask by [mask; mask_in].

    `prompts` is [batch, k, hidden]; `mask` [batch, k] says which virtual positions exist per row (a
    row whose prompt is shorter, or has none, in a mixed batch). Returns (kwargs, virtual positions
    in the output: k for a decoder-only model, 0 for an encoder-decoder one).
    """
    kw = dict(kwargs)
    embeds = model.get_input_embeddings()(kw.pop("input_ids"))
    kw["inputs_embeds"] = torch.cat([prompts.to(embeds.dtype), embeds], dim=1)
    attn = kw.get("attention_mask")
    if attn is None:
        attn = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    kw["attention_mask"] = torch.cat([mask.to(attn.dtype), attn], dim=1)
    return kw, 0 if model_is_encoder_decoder(model) else prompts.shape[1]


class PromptEncoder(SequenceAdapter):
    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.prompt_embeddings = nn.Parameter(init.detach().to(torch.float32).clone())

    def transform(self, model: nn.Module, kwargs: dict, generation: bool) -> tuple[dict, int]:
        batch = kwargs["input_ids"].shape[0]
        prompts = self.prompt_embeddings.unsqueeze(0).expand(batch, -1, -1)
        mask = torch.ones(prompts.shape[:2], dtype=torch.long, device=prompts.device)
        return embed_with_prompts(model, kwargs, prompts, mask)

    @staticmethod
    def transform_rows(model: nn.Module, kwargs: dict, per_row: list, generation: bool) -> tuple[dict, int]:
        """Each row its own prompt (None: none), in one forward. Shorter prompts are left-padded with masked
        slots, so every row's prompt sits right before its tokens; a decoder-only call without generation's
        own position ids gets positions that count unmasked slots only, as the row alone would have."""
        k = max(e.prompt_embeddings.shape[0] for e in per_row if e is not None)
        ref = next(e for e in per_row if e is not None).prompt_embeddings
        prompts = ref.new_zeros(len(per_row), k, ref.shape[1])
        mask = torch.zeros(len(per_row), k, dtype=torch.long, device=ref.device)
        for row, enc in enumerate(per_row):
            if enc is not None:
                n = enc.prompt_embeddings.shape[0]
                prompts[row, k - n:], mask[row, k - n:] = enc.prompt_embeddings, 1
        kw, virtual = embed_with_prompts(model, kwargs, prompts, mask)
        if not generation and virtual and "position_ids" not in kw:
            kw["position_ids"] = (kw["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return kw, virtual


def initial_prompt(model: nn.Module, cfg: PeftConfig, tokenizer) -> torch.Tensor:
    """The k starting embeddings for `cfg.prompt_init` (draws from torch's RNG for vocab/random)."""
    table = model.get_input_embeddings().weight.detach()
    k = cfg.num_virtual_tokens
    if cfg.prompt_init == "random":
        return torch.randn(k, table.shape[1], device=table.device) * table.float().std()
    if cfg.prompt_init == "vocab":
        ids = torch.randint(0, table.shape[0], (k,), device=table.device)
    else:
        if tokenizer is None:
            raise ConfigError("peft.prompt_init: text needs the tokenizer; it is given to the method by qtrain train")
        tokens = tokenizer(cfg.prompt_init_text, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ConfigError(f"peft.prompt_init_text: {cfg.prompt_init_text!r} has no tokens; give some text")
        ids = torch.tensor((tokens * math.ceil(k / len(tokens)))[:k], device=table.device)
    return table[ids].float()


def _dims(model: nn.Module) -> tuple[int, int]:
    c = model.config
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "num_layers")
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "num_heads")
    return int(layers), int(heads)


class PromptTuning(Method):
    name = "prompt_tuning"
    peft_type = "PROMPT_TUNING"
    fused_loss = False
    merge_refusal = ("prompt tuning learns input embeddings, not a change to any weight: there is nothing to fold "
                     "into the base; serve the adapter with qtrain generate instead")

    def inject(self, model: nn.Module, cfg: PeftConfig, tokenizer=None) -> list[str]:
        freeze(model)
        attach(model, PromptEncoder(initial_prompt(model, cfg, tokenizer)))
        return []

    def describe(self, cfg: PeftConfig, names: list[str]) -> str:
        return f"prompt tuning: {cfg.num_virtual_tokens} virtual tokens ({cfg.prompt_init} init)"

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        adapter = sequence_adapter(model)
        return {KEY: adapter.prompt_embeddings} if isinstance(adapter, PromptEncoder) else {}

    def artifact_config(self, model: nn.Module, cfg: PeftConfig, base_model: str) -> dict:
        layers, heads = _dims(model)
        prompt = sequence_adapter(model).prompt_embeddings
        # RANDOM: peft re-runs the init when it loads, and TEXT would need the tokenizer by name;
        # the saved embeddings replace it either way.
        return {"peft_type": self.peft_type, "task_type": task_type_of(model), "base_model_name_or_path": base_model,
                "num_virtual_tokens": prompt.shape[0], "token_dim": prompt.shape[1], "num_transformer_submodules": 1,
                "num_attention_heads": heads, "num_layers": layers, "prompt_tuning_init": "RANDOM",
                "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "inference_mode": True,
                "modules_to_save": None}

    def config_from_artifact(self, config: dict) -> PeftConfig:
        return PeftConfig(method=self.name, num_virtual_tokens=int(config["num_virtual_tokens"]), prompt_init="random")

    def attach(self, model: nn.Module, name: str, cfg: PeftConfig, tensors: dict[str, torch.Tensor],
               source: str) -> None:
        hidden = model.get_input_embeddings().weight.shape[1]
        encoder = PromptEncoder(torch.zeros(cfg.num_virtual_tokens, hidden,
                                            device=model.get_input_embeddings().weight.device))
        attach_saved(model, name, encoder, {KEY: encoder.prompt_embeddings}, tensors, source)
