"""Split a nested state (dicts, lists, tensors, scalars) into JSON + named tensors, and back.

Checkpoints store tensors only through safetensors and everything else as JSON, so loading a
checkpoint never unpickles anything. Works for torch and bitsandbytes optimizer states alike.
"""

from __future__ import annotations

from typing import Any

import torch

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_INT_KEYS = "__int_keys__"


def flatten(obj: Any, prefix: str = "", copy: bool = True) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON tree, {path: tensor}); `copy=False` keeps the tensors themselves (e.g. sharded DTensors
    for torch.distributed.checkpoint), instead of contiguous CPU copies for safetensors."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().to("cpu").contiguous() if copy else x
            return {_TENSOR: path}
        if isinstance(x, dict):
            int_keys = all(isinstance(k, int) for k in x) and bool(x)
            out = {str(k): walk(v, f"{path}.{k}") for k, v in x.items()}
            return {_INT_KEYS: out} if int_keys else out
        if isinstance(x, (list, tuple)):
            items = [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
            return {_TUPLE: items} if isinstance(x, tuple) else items
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store a {type(x).__name__} at {path} in a checkpoint")

    return walk(obj, prefix or "root"), tensors


def unflatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR}:
            return tensors[tree[_TENSOR]]
        if set(tree) == {_TUPLE}:
            return tuple(unflatten(v, tensors) for v in tree[_TUPLE])
        if set(tree) == {_INT_KEYS}:
            return {int(k): unflatten(v, tensors) for k, v in tree[_INT_KEYS].items()}
        return {k: unflatten(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unflatten(v, tensors) for v in tree]
    return tree
