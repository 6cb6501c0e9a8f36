"""Weights of a full fine-tuning run (`peft.method: full`): every trainable tensor, by parameter name.

Inside a checkpoint they are one `weights.safetensors` (fp32 master weights, exactly what resume
needs); the run's final artifact is a normal Hugging Face model dir (`<output_dir>/model/`, in
the recipe's dtype, with the tokenizer) that `from_pretrained` and `qtrain eval` load.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qtrain.checkpoint.atomic import atomic_dir
from qtrain.errors import CheckpointError

WEIGHTS_NAME = "weights.safetensors"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that requires grad (tied ones once), detached and contiguous on CPU."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _check_finite(state: dict[str, torch.Tensor], where: Path) -> None:
    bad = next((k for k, v in state.items() if not torch.isfinite(v).all()), None)
    if bad is not None:
        raise CheckpointError(f"refusing to save non-finite weights to {where}: {bad} has NaN/inf values")


def write_weights(model: nn.Module, path: Path) -> None:
    state = trainable_state(model)
    if not state:
        raise CheckpointError(f"refusing to save {path}: the model has no trainable parameters")
    _check_finite(state, path)
    save_file(state, str(path), metadata={"format": "pt"})


def load_weights(model: nn.Module, path: Path) -> None:
    """Copy `path`'s tensors into the model's trainable parameters; every name and shape must match."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - corrupt files raise several types
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    missing = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    if missing or extra:
        first = f"no tensor {missing[0]}" if missing else f"an unknown tensor {extra[0]}"
        raise CheckpointError(f"{path} has {first}: it was written for a different model; "
                              "resume with the recipe that wrote it")
    with torch.no_grad():
        for name, param in params.items():
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise CheckpointError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, the model needs "
                                      f"{tuple(param.shape)}")
            param.copy_(tensors[name])


def save_model_dir(model: nn.Module, tokenizer, dtype: torch.dtype, out_dir: str | Path) -> Path:
    """Write the fine-tuned model as a normal HF dir (sharded safetensors + config + tokenizer), atomically."""
    state = cast_state(model.state_dict(), dtype)
    _check_finite({k: v for k, v in state.items() if v.is_floating_point()}, Path(out_dir))
    with atomic_dir(out_dir) as tmp:
        # What the saved config says: the saved dtype, and the KV cache on (training turned it off).
        previous = model.config.dtype, model.config.use_cache
        model.config.dtype, model.config.use_cache = dtype, True
        try:
            model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        finally:
            model.config.dtype, model.config.use_cache = previous
        tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


def cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`state` on CPU with floating tensors in `dtype`; names that share one tensor (tied weights)
    still share one cast copy, so save_pretrained writes it once."""
    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, value in state.items():
        key = (value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
        if key not in copies:
            copies[key] = value.detach().to("cpu", dtype) if value.is_floating_point() else value.detach().to("cpu")
        out[name] = copies[key]
    return out
