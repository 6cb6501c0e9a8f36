"""What the plan is for: the device kind, how many processes, each device's memory, and the dtypes.

Memory sizes are read as people write them: SI units (`80GB` = 80·10⁹ bytes), binary units
(`24GiB` = 24·2³⁰) and bare `G`/`M` as binary, the way nvidia-smi and PyTorch count. GPU
vendors' "24 GB" cards hold 24 GiB, so `24GiB` is the exact spelling for them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

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


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def model_dtype_name(recipe: Recipe, device: str) -> str:
    """The recipe's `model.dtype`, with `auto` resolved: bf16 on GPUs (fp16 with loss scaling on
    pre-Ampere GPUs is the trainer's choice; the sizes are the same), fp32 on CPUs without native bf16."""
    name = recipe.model.dtype
    if name != "auto":
        return name
    if device == "cuda":
        return "bfloat16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def compute_dtype_name(recipe: Recipe, device: str) -> str:
    """The dtype matmuls and saved activations use: the autocast dtype when autocast is on, else the model's."""
    model = model_dtype_name(recipe, device)
    mode = recipe.train.autocast
    if mode == "on" or (mode == "auto" and model == "bfloat16"):
        return "bfloat16"
    return model


def machine_memory() -> int | None:
    """Physical memory of this machine (the capacity of a `--device cpu` plan), if the OS says."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
