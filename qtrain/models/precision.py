"""Which floating-point precision a run computes in, chosen from the device when the recipe says `auto`.

Measured on a 2-core AMD EPYC with AVX2 only (no AVX-512 BF16, no AMX): the quickstart's median step
took 4.33 s in bf16 and 0.24 s in fp32, and a bf16 matmul alone is ~30x slower than fp32 there,
because the CPU has no bf16 arithmetic and oneDNN emulates it. GPUs before Ampere (T4, V100) have
the same trap: no bf16 units, so fp16 with dynamic loss scaling is what runs fast there.

`auto` therefore picks:
- CUDA with compute capability >= 8.0: bf16 (autocast, no loss scaling needed);
- older CUDA GPUs: fp16 autocast with dynamic loss scaling (see qtrain/train/scaler.py);
- CPUs with AVX-512 BF16 or AMX: bf16;
- other CPUs: fp32 (no autocast).
The NF4 storage of a quantized base does not change; only the unquantized weights and the compute
follow this choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# What an `auto` run writes a random-init base in (model.from_config): the dtype real checkpoints ship
# in, so the base dir is the same file on every machine whatever each one computes in.
AUTO_STORAGE_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Precision:
    """The compute dtype of a run and why it was picked.

    Attributes:
        dtype: the dtype of the unquantized weights (embeddings, norms, lm_head) and of NF4 dequantization.
        reason: one line for the run header and summary.json (`compute_dtype_reason`).
    """

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def cpu_native_bf16() -> tuple[bool, str]:
    """(whether this CPU computes bf16 natively, the instruction-set evidence)."""
    amx = _probe("_is_amx_tile_supported") or _cpu_flag("amx_bf16")
    avx512_bf16 = _probe("_is_avx512_bf16_supported") or _cpu_flag("avx512_bf16")
    if amx:
        return True, "AMX"
    if avx512_bf16:
        return True, "AVX-512 BF16"
    return False, "no AVX-512 BF16 or AMX"


def _probe(name: str) -> bool:
    fn = getattr(torch.cpu, name, None)
    try:
        return bool(fn()) if fn is not None else False
    except RuntimeError:
        return False


def _cpu_flag(flag: str) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(line.startswith("flags") and flag in line.split() for line in text.splitlines())


def auto_precision(device: torch.device) -> Precision:
    """The precision `model.dtype: auto` resolves to on `device`."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return Precision(torch.bfloat16, f"auto: CUDA capability {major}.{minor} computes bf16 natively")
        return Precision(torch.float16, f"auto: CUDA capability {major}.{minor} has no bf16 units; "
                                        "fp16 with dynamic loss scaling")
    if device.type == "cpu":
        native, evidence = cpu_native_bf16()
        if native:
            return Precision(torch.bfloat16, f"auto: this CPU has {evidence} (native bf16)")
        return Precision(torch.float32, f"auto: this CPU has {evidence}, where bf16 matmuls are ~30x slower "
                                        "than fp32; fp32 compute")
    return Precision(torch.float32, f"auto: no bf16/fp16 policy for device type {device.type!r}; fp32 compute")


def resolve_precision(model_dtype: str, device: torch.device) -> Precision:
    """`model.dtype` (auto | bfloat16 | float16 | float32) -> the run's Precision on `device`."""
    if model_dtype == "auto":
        return auto_precision(device)
    if model_dtype not in DTYPES:
        raise ValueError(f"model.dtype: expected auto, bfloat16, float16 or float32; got {model_dtype!r}")
    return Precision(DTYPES[model_dtype], f"set by the recipe (model.dtype: {model_dtype})")


def storage_dtype(model_dtype: str) -> torch.dtype:
    """The dtype a `model.from_config` base is written in (see AUTO_STORAGE_DTYPE)."""
    return AUTO_STORAGE_DTYPE if model_dtype == "auto" else DTYPES[model_dtype]
