"""Which architecture a base model is: decoder-only (causal LM) or encoder-decoder (T5 family).

Everything that differs between the two (the transformers auto class, how data is encoded,
where the loss is taken, how generation runs) asks one of these functions, so the answer comes
from the model's transformers config (`is_encoder_decoder`) and nowhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from qtrain.config.schema import ModelConfig
from qtrain.errors import ConfigError, ModelError


def config_is_encoder_decoder(config: Any) -> bool:
    """True for a transformers config of an encoder-decoder model (T5, BART, ...)."""
    return bool(getattr(config, "is_encoder_decoder", False))


def model_is_encoder_decoder(model: nn.Module) -> bool:
    """True for a loaded encoder-decoder model (possibly with adapters attached)."""
    return config_is_encoder_decoder(getattr(model, "config", None))


def plain_lm_head(model: nn.Module) -> bool:
    """The output head is a bias-free linear whose logits are neither scaled nor softcapped: what the
    fused linear + cross-entropy (`qtrain_kernels.fused_ce`) can stand in for."""
    head = model.get_output_embeddings()
    cfg = model.config
    scaled = any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    return isinstance(head, nn.Linear) and head.bias is None and not scaled


def read_config(model_dir: str | Path, trust_remote_code: bool = False) -> Any:
    """The transformers config of a local model dir; ModelError naming `model.path` if unreadable."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - many error types for a bad config.json
        raise ModelError(f"model.path: cannot read a transformers config from {model_dir}: {exc}") from None


def from_config_config(from_config: dict[str, Any]) -> Any:
    """A transformers config for a recipe's `model.from_config` dict, without a tokenizer.

    Only the architecture is read from it; vocab size and special ids (filled in from the
    tokenizer when the base is written, see build.model_config) do not change it.
    """
    from transformers import AutoConfig

    cfg = dict(from_config)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise ConfigError("model.from_config.model_type: not set; name a transformers model type, e.g. llama or t5")
    try:
        return AutoConfig.for_model(model_type, **cfg)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"model.from_config: transformers cannot build a {model_type!r} config: {exc}") from None


def is_encoder_decoder(model_cfg: ModelConfig) -> bool:
    """Whether the recipe's base (`model.path` or `model.from_config`) is an encoder-decoder model."""
    if model_cfg.path is not None:
        path = Path(model_cfg.path)
        if not (path / "config.json").is_file():
            raise ModelError(f"model.path: {path} is not a Hugging Face model dir (no config.json)")
        return config_is_encoder_decoder(read_config(path, model_cfg.trust_remote_code))
    if model_cfg.from_config is not None:
        return config_is_encoder_decoder(from_config_config(model_cfg.from_config))
    raise ConfigError("model: set model.path (a local model dir) or model.from_config")


def auto_model_class(config: Any):
    """AutoModelForSeq2SeqLM for an encoder-decoder config, else AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if config_is_encoder_decoder(config) else AutoModelForCausalLM


def decoder_start_id(model: nn.Module) -> int:
    """The id an encoder-decoder model's decoder starts from (T5: the pad id)."""
    config = model.config
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
    if start is None:
        raise ModelError("the model's config.json has no decoder_start_token_id; set it (T5 uses the pad id, 0)")
    return int(start)


def collate_start_id(model: nn.Module) -> int | None:
    """The decoder start id `data.collate` needs for this model: None for a decoder-only model."""
    return decoder_start_id(model) if model_is_encoder_decoder(model) else None
