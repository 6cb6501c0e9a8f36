"""Write a random-init model from a transformers config as a normal HF model dir (deterministic by seed).

This is how the quickstart and the tests get a base model without a hub: the dir it writes is
loaded by the same streaming loader as any user model, and adapters point at it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qtrain.checkpoint.atomic import atomic_dir
from qtrain.errors import ConfigError
from qtrain.models.arch import auto_model_class, config_is_encoder_decoder

FINGERPRINT = "qtrain_base.json"


def model_config(from_config: dict[str, Any], tokenizer) -> Any:
    """A transformers config from the recipe dict; vocab and special ids default to the tokenizer's.

    An encoder-decoder model's decoder starts from the pad id unless the dict says otherwise (T5's
    convention).
    """
    from transformers import AutoConfig

    cfg = dict(from_config)
    model_type = cfg.pop("model_type")
    cfg.setdefault("vocab_size", len(tokenizer))
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        cfg.setdefault(name, getattr(tokenizer, name))
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"model.from_config: transformers cannot build a {model_type!r} config: {exc}") from None
    if config_is_encoder_decoder(config) and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = tokenizer.pad_token_id
    if config.vocab_size < len(tokenizer):
        raise ConfigError(f"model.from_config.vocab_size: {config.vocab_size} is smaller than the tokenizer's "
                          f"{len(tokenizer)} tokens; remove it to use the tokenizer's size")
    return config


def write_random_base(from_config: dict[str, Any], tokenizer, seed: int, dtype: torch.dtype, out_dir: str | Path) -> Path:
    """Create (once) `out_dir` holding config.json, model.safetensors and the tokenizer.

    An existing dir written from the same config, seed and dtype is reused as is; a dir that
    qtrain did not write is never overwritten.
    """
    out = Path(out_dir)
    stamp = {"from_config": from_config, "seed": seed, "dtype": str(dtype).replace("torch.", "")}
    marker = out / FINGERPRINT
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out
    if out.exists() and any(out.iterdir()) and not marker.is_file():
        raise ConfigError(f"model.base_dir: {out} exists and was not written by qtrain; choose an empty or new dir")
    config = model_config(from_config, tokenizer)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = auto_model_class(config).from_config(config, dtype=dtype)
    with atomic_dir(out) as tmp:
        save_hf_dir(model, dtype, tmp)
        tokenizer.save_pretrained(str(tmp))
        (tmp / FINGERPRINT).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    return out


def save_hf_dir(model, dtype: torch.dtype, out: Path) -> None:
    """config.json (+ generation_config.json) and one model.safetensors, as `save_pretrained` writes a small
    model: tied aliases (`lm_head.weight` of `embed_tokens`) are left out and re-tied at load.

    Written here rather than with `save_pretrained`, which unwraps the model through accelerate, and that
    imports DeepSpeed whenever it is installed: a plain CPU run then printed DeepSpeed's accelerator warning
    and paid its import time.
    """
    from safetensors.torch import save_file

    tied = set(model.all_tied_weights_keys)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    model.config.dtype = dtype
    model.config.save_pretrained(str(out))
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(str(out))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
