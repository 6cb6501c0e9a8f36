"""What the plan is for: the device kind, how many processes, each device's memory, and the dtypes.

Memory sizes are read as people write them: SI units (`80GB` = 80·10⁹ bytes), binary units
(`24GiB` = 24·2³⁰) and bare `G`/`M` as binary, the way nvidia-smi and PyTorch count. GPU
vendors' "24 GB" cards hold 24 GiB, so `24GiB` is the exact spelling for them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from qtrain.config.schema import Recipe
from qtrain.errors import ConfigError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def parse_memory(text: str, flag: str = "--gpu-mem") -> int:
    """`24GiB`, `80GB`, `81920MiB`, `24G` -> bytes; ConfigError naming `flag` otherwise."""
    match = _SIZE.fullmatch(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"{flag}: cannot read {text!r} as a memory size; write a number and a unit, "
                          "e.g. 24GiB, 80GB or 81920MiB")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class Target:
    """Where the run would go: `device` "cpu" or "cuda", `world` processes (one device each), and
    `capacity` bytes of memory per device (None: unknown, no verdict)."""

    device: str = "cuda"
    world: int = 1
    capacity: int | None = None


def model_dtype_name(recipe: Recipe, device: str) -> str:
    """The recipe's `model.dtype` with `auto` resolved as the trainer resolves it on `device`
    (qtrain/models/precision.py). Planning for a GPU this machine does not have: bf16, as on
    Ampere and newer (older GPUs compute in fp16, which takes the same bytes)."""
    name = recipe.model.dtype
    if name != "auto":
        return name
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return "bfloat16"
    from qtrain.models.precision import resolve_precision

    return resolve_precision(name, torch.device(device)).name


def compute_dtype_name(recipe: Recipe, device: str) -> str:
    """The dtype matmuls and saved activations use, as the trainer's `autocast_dtype` decides:
    the 16-bit model dtype unless autocast is off, bf16 when autocast is forced on over fp32."""
    model = model_dtype_name(recipe, device)
    mode = recipe.train.autocast
    if mode == "off" or model in ("bfloat16", "float16"):
        return model
    return "bfloat16" if mode == "on" else model


def machine_memory() -> int | None:
    """Physical memory of this machine (the capacity of a `--device cpu` plan), if the OS says."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory(device, local_world: int = 1) -> int | None:
    """Bytes free for one process on `device` (a torch.device) now: the GPU's free memory, or this
    machine's available memory (/proc/meminfo's MemAvailable, else its physical memory) shared by
    the node's `local_world` processes; None if unknown."""
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    total = _meminfo_available() or machine_memory()
    return None if total is None else total // max(1, local_world)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
