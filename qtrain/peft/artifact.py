"""An adapter dir on disk: `adapter_config.json` + `adapter_model.safetensors`, for every method.

Methods peft has (LoRA, DoRA, (IA)^3, prompt/prefix tuning, BitFit as BEFT) write peft's keys and
config, so `peft.PeftModel.from_pretrained` loads them; the others write the same two files in
qtrain's own documented format (docs/methods.md), marked by `qtrain_method` in the config.
Writes are atomic (a reader sees the old dir or the whole new one) and refuse empty or
non-finite tensors; reads name the file that is unusable.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qtrain.checkpoint.atomic import atomic_dir
from qtrain.errors import CheckpointError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's key prefix for layer adapters: PeftModel -> LoraModel -> the model


def to_cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies (what safetensors writes)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def write_adapter_files(state: dict[str, torch.Tensor], config: dict, out_dir: Path) -> None:
    """Write the two adapter files into an existing dir; refuses an empty or non-finite adapter."""
    if not state:
        raise CheckpointError(f"refusing to save an empty adapter to {out_dir}: the model has no adapter layers")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"refusing to save a non-finite adapter to {out_dir}: {bad[0]} has NaN/inf values")
    save_file(to_cpu(state), str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def save_adapter_dir(state: dict[str, torch.Tensor], config: dict, out_dir: str | Path) -> Path:
    """`write_adapter_files` into `out_dir`, atomically."""
    with atomic_dir(out_dir) as tmp:
        write_adapter_files(state, config, tmp)
    return Path(out_dir)


def read_config(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"adapter file missing: {path} (an adapter dir holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot parse {path}: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"file missing: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, tensors) of an adapter dir of any method; CheckpointError naming the file if unusable."""
    d = Path(adapter_dir)
    for p in (d / CONFIG_NAME, d / WEIGHTS_NAME):
        if not p.is_file():
            raise CheckpointError(f"adapter file missing: {p} (an adapter dir holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    return read_config(d), read_tensors(d / WEIGHTS_NAME)


def load_named(params: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], what: str = "layer") -> None:
    """Copy `tensors` into `params` (artifact key -> parameter or buffer): every key present, every
    shape right, nothing extra, everything finite; CheckpointError naming the first key that is not."""
    for key, param in params.items():
        if key not in tensors:
            raise CheckpointError(f"adapter has no tensor {key}: it was trained for a different model or targets")
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise CheckpointError(f"adapter tensor {key} has shape {tuple(tensors[key].shape)}, the model needs "
                                  f"{tuple(param.shape)}: the adapter was trained on a different base model")
    extra = sorted(set(tensors) - set(params))
    if extra:
        raise CheckpointError(f"adapter tensor {extra[0]} matches no {what} of this model "
                              f"({len(extra)} such tensors): different base model or targets")
    if not math.isfinite(sum(float(t.float().abs().sum()) for t in tensors.values() if t.is_floating_point())):
        raise CheckpointError("adapter holds NaN/inf values")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])


def trainable_named(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that requires grad, by parameter name (tied ones once)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
