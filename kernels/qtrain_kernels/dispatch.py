"""The one place that picks an implementation for each op.

Backends:
- "reference": pure torch (`nf4_reference`), runs anywhere, the oracle for every kernel;
- "bnb": bitsandbytes' own dequantize op (native C on CPU, CUDA kernel on GPU);
- "triton": fused kernels (not built yet; `available_backends()` does not list it).
"""

from __future__ import annotations

import functools

import torch

from qtrain_kernels import nf4_reference as ref


@functools.lru_cache(maxsize=None)
def _bnb_op(name: str):
    try:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
    except Exception:  # noqa: BLE001
        return None
    return getattr(getattr(torch.ops, "bitsandbytes", None), name, None)


def available_backends() -> list[str]:
    out = ["reference"]
    if _bnb_op("dequantize_4bit") is not None:
        out.append("bnb")
    return out


def resolve(kernels: str) -> str:
    """Map the recipe's `kernels: auto|triton|torch` to a backend name; ValueError if impossible."""
    if kernels == "triton":
        raise ValueError("kernels=triton: the fused Triton kernels are not part of this build yet; "
                         "use kernels=torch or kernels=auto")
    if kernels in ("auto", "torch"):
        return "bnb" if "bnb" in available_backends() else "reference"
    raise ValueError(f"kernels={kernels!r}: expected auto, triton or torch")


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                   blocksize: int, out: torch.Tensor | None = None, backend: str = "bnb") -> torch.Tensor:
    """Packed NF4 + float32 per-block absmax → dense weight; identical values on every backend."""
    op = _bnb_op("dequantize_4bit") if backend == "bnb" else None
    if op is None or not shape[-1] % 2 == 0:
        return ref.dequantize_nf4(packed, absmax, shape, dtype, blocksize, out=out)
    # bitsandbytes registers no CPU `.out` variant; its op allocates, so `out` is not used here.
    return op.default(packed, absmax, blocksize, "nf4", list(shape), dtype)


def dequantize_absmax(codes: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor,
                      backend: str = "bnb") -> torch.Tensor:
    """Undo double quantization: uint8 codes of the dynamic map → float32 per-block absmax.

    Runs on every dequantization of a double-quantized weight, so it uses bitsandbytes' native
    op where it can (profiled: ~10 ms per CPU benchmark step in pure torch).
    """
    op = _bnb_op("dequantize_blockwise") if backend == "bnb" else None
    if op is None:
        return ref.dequantize_absmax(codes, absmax2, offset)
    code = ref.dynamic_map(codes.device)
    return op.default(codes, absmax2, code, ref.ABSMAX_BLOCKSIZE, torch.float32) + offset
