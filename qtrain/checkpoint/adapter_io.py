"""Adapters on disk in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Key names are PEFT's (`base_model.model.<module>.lora_A.weight`), so `peft.PeftModel.from_pretrained`
loads what we write, and we load what peft writes for LoRA. `task_type` is SEQ_2_SEQ_LM for an
encoder-decoder base (T5 family) and CAUSAL_LM otherwise, so peft wraps the model it loads the
adapter into with the matching class.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qtrain.checkpoint.atomic import atomic_dir
from qtrain.config.schema import PeftConfig
from qtrain.errors import CheckpointError
from qtrain.models.arch import model_is_encoder_decoder
from qtrain.peft.inject import lora_modules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-named LoRA tensors, detached and contiguous on CPU."""
    out = {}
    for name, mod in lora_modules(model).items():
        out[f"{PREFIX}{name}.lora_A.weight"] = mod.lora_A.weight.detach().to("cpu").contiguous()
        out[f"{PREFIX}{name}.lora_B.weight"] = mod.lora_B.weight.detach().to("cpu").contiguous()
    return out


def task_type_of(model: nn.Module) -> str:
    """peft's task type for `model`: SEQ_2_SEQ_LM (encoder-decoder) or CAUSAL_LM."""
    return "SEQ_2_SEQ_LM" if model_is_encoder_decoder(model) else "CAUSAL_LM"


def adapter_config(cfg: PeftConfig, base_model: str, task_type: str = "CAUSAL_LM") -> dict:
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.targets,
        "use_rslora": cfg.rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def write_adapter_files(model: nn.Module, cfg: PeftConfig, base_model: str, out_dir: Path) -> None:
    """Write the two adapter files into an existing dir; refuses an empty or non-finite adapter."""
    state = adapter_state(model)
    if not state:
        raise CheckpointError(f"refusing to save an empty adapter to {out_dir}: the model has no LoRA layers")
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"refusing to save a non-finite adapter to {out_dir}: {bad[0]} has NaN/inf values")
    save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    config = adapter_config(cfg, base_model, task_type_of(model))
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def save_adapter(model: nn.Module, cfg: PeftConfig, base_model: str, out_dir: str | Path) -> Path:
    """Write the adapter dir atomically: readers see the old adapter or the whole new one."""
    with atomic_dir(out_dir) as tmp:
        write_adapter_files(model, cfg, base_model, tmp)
    return Path(out_dir)


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, tensors) of an adapter dir; CheckpointError naming the file if unusable."""
    d = Path(adapter_dir)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise CheckpointError(f"adapter file missing: {p} (an adapter dir holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot parse {cfg_path}: {exc}") from None
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type is {config.get('peft_type')!r}; only LORA adapters load here")
    try:
        with safe_open(str(w_path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise CheckpointError(f"cannot read {w_path}: {exc}") from None
    return config, tensors


def peft_config_of(config: dict) -> PeftConfig:
    return PeftConfig(r=int(config["r"]), alpha=float(config["lora_alpha"]),
                      dropout=float(config.get("lora_dropout", 0.0)), targets=config["target_modules"],
                      rslora=bool(config.get("use_rslora", False)))


def load_adapter_weights(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into the model's LoRA layers; every key and shape must match."""
    mods = lora_modules(model)
    expected = set()
    for name, mod in mods.items():
        for part in ("lora_A", "lora_B"):
            key = f"{PREFIX}{name}.{part}.weight"
            expected.add(key)
            if key not in tensors:
                raise CheckpointError(f"adapter has no tensor {key}: it was trained for a different model or targets")
            param = getattr(mod, part).weight
            if tuple(tensors[key].shape) != tuple(param.shape):
                raise CheckpointError(f"adapter tensor {key} has shape {tuple(tensors[key].shape)}, the model needs "
                                      f"{tuple(param.shape)}: the adapter was trained on a different base model")
            with torch.no_grad():
                param.copy_(tensors[key])
    extra = sorted(set(tensors) - expected)
    if extra:
        raise CheckpointError(f"adapter tensor {extra[0]} matches no LoRA layer of this model "
                              f"({len(extra)} such tensors): different base model or targets")
    if not math.isfinite(sum(float(t.float().abs().sum()) for t in tensors.values())):
        raise CheckpointError("adapter holds NaN/inf values")
