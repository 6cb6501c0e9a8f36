"""The one place that picks an implementation for each op.

Backends (what `resolve` returns for the recipe's `kernels: auto|triton|torch`):
- "reference": pure torch (`nf4_reference`), runs anywhere, the oracle for every kernel;
- "bnb": on CPU tensors qtrain's own C++ kernel (`nf4_cpu`: both quantization levels in one
  multithreaded AVX2 pass), bitsandbytes' dequantize op where that kernel does not apply or cannot
  be built; bitsandbytes' CUDA kernel on GPU;
- "triton": the fused kernels in `qtrain_kernels.triton` (CUDA, or the Triton interpreter on CPU
  when TRITON_INTERPRET=1, which is how the CPU test suite runs them).

Nothing here imports triton at import time: `import qtrain_kernels` must work on a machine
without it. Each triton call site asks `use_triton(backend, tensor)`, which is false for tensors
the kernels cannot run on (a CPU tensor outside the interpreter); those calls take the torch path.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch

from qtrain_kernels import nf4_reference as ref


@dataclass(frozen=True)
class NF4Buffers:
    """One NF4 weight as the fused kernels read it: bitsandbytes' layout (see `nf4_reference`).

    `absmax` is float32 per block, or, with double quantization (`absmax2` set), the uint8 codes
    that `absmax2` (float32, one per 256 blocks) and the scalar `offset` decode.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    blocksize: int = 64
    absmax2: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None


@functools.lru_cache(maxsize=None)
def _bnb_op(name: str):
    try:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
    except Exception:  # noqa: BLE001
        return None
    return getattr(getattr(torch.ops, "bitsandbytes", None), name, None)


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure means: no triton backend
        return f"{type(exc).__name__}: {exc}"
    return None


def interpreting() -> bool:
    """True when TRITON_INTERPRET is on: Triton kernels then run on CPU tensors, in numpy."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def triton_unavailable_reason() -> Optional[str]:
    """None when the triton backend can run here, else what is missing (for error messages)."""
    err = _triton_import_error()
    if err is not None:
        return f"the `triton` package does not import ({err}); install it with `pip install triton`"
    if not (torch.cuda.is_available() or interpreting()):
        return "no CUDA device is visible (torch.cuda.is_available() is False) and TRITON_INTERPRET is not set"
    return None


def available_backends() -> list[str]:
    out = ["reference"]
    if _bnb_op("dequantize_4bit") is not None:
        out.append("bnb")
    if triton_unavailable_reason() is None:
        out.append("triton")
    return out


def resolve(kernels: str) -> str:
    """Map the recipe's `kernels: auto|triton|torch` to a backend name; ValueError if impossible.

    `auto` is the torch path (bitsandbytes' dequant + cuBLAS) for now: the Triton kernels are
    verified under the interpreter in fp32/fp16 only, and have not yet run on a GPU (bf16 tests
    and benchmarks pending), so they are opt-in with `kernels: triton` until a GPU run validates
    them. Then `auto` should pick triton on CUDA (never the interpreter: far too slow to train).
    """
    if kernels == "triton":
        reason = triton_unavailable_reason()
        if reason is not None:
            raise ValueError(f"kernels=triton: {reason}; use kernels=torch or kernels=auto")
        return "triton"
    if kernels in ("auto", "torch"):
        return "bnb" if _bnb_op("dequantize_4bit") is not None else "reference"
    raise ValueError(f"kernels={kernels!r}: expected auto, triton or torch")


def use_triton(backend: str, tensor: torch.Tensor) -> bool:
    """Whether a call with this backend on this tensor runs the Triton kernels."""
    if backend != "triton" or _triton_import_error() is not None:
        return False
    return tensor.is_cuda or (tensor.device.type == "cpu" and interpreting())


def kernel_device(t: torch.Tensor):
    """Context that makes `t`'s GPU current: Triton launches on the current device, not the tensor's."""
    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                   blocksize: int, out: torch.Tensor | None = None, backend: str = "bnb") -> torch.Tensor:
    """Packed NF4 + float32 per-block absmax → dense weight; identical values on every backend."""
    if use_triton(backend, packed):
        from qtrain_kernels.triton.nf4_dequant import dequantize_nf4 as triton_dequantize

        return triton_dequantize(packed, absmax, shape, dtype, blocksize, out=out)
    op = _bnb_op("dequantize_4bit") if backend in ("bnb", "triton") else None
    # bitsandbytes 0.50.2's CPU op returns wrong values for some rows that do not hold whole
    # blocks (found: every K of 80 or 96 with more than one row; 130, 200 were right), so the
    # native op only gets block-aligned rows (every real model shape); the rest is the reference.
    if op is None or shape[-1] % blocksize != 0:
        return ref.dequantize_nf4(packed, absmax, shape, dtype, blocksize, out=out)
    # bitsandbytes registers no CPU `.out` variant; its op allocates, so `out` is not used here.
    return op.default(packed, absmax, blocksize, "nf4", list(shape), dtype)


def dequantize_absmax(codes: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor,
                      backend: str = "bnb") -> torch.Tensor:
    """Undo double quantization: uint8 codes of the dynamic map → float32 per-block absmax.

    Runs on every dequantization of a double-quantized weight, so it uses bitsandbytes' native
    op where it can (profiled: ~10 ms per CPU benchmark step in pure torch). The triton backend
    uses it too: the fused kernels decode the codes themselves, this is only the unfused path.
    """
    op = _bnb_op("dequantize_blockwise") if backend in ("bnb", "triton") else None
    if op is None:
        return ref.dequantize_absmax(codes, absmax2, offset)
    code = ref.dynamic_map(codes.device)
    return op.default(codes, absmax2, code, ref.ABSMAX_BLOCKSIZE, torch.float32) + offset


def dequantize_buffers(nf4: NF4Buffers, dtype: torch.dtype, backend: str = "bnb") -> torch.Tensor:
    """The dense weight of `nf4` in `dtype`; on the triton backend, and on the bnb backend for CPU
    tensors, one kernel decodes both levels."""
    if use_triton(backend, nf4.packed):
        from qtrain_kernels.triton import nf4_dequant

        if nf4.double_quant:
            return nf4_dequant.dequantize_nf4_double_quant(nf4.packed, nf4.absmax, nf4.absmax2, nf4.offset,
                                                           nf4.shape, dtype, nf4.blocksize)
        return nf4_dequant.dequantize_nf4(nf4.packed, nf4.absmax, nf4.shape, dtype, nf4.blocksize)
    if backend in ("bnb", "triton") and nf4.packed.device.type == "cpu":
        from qtrain_kernels import nf4_cpu

        w = nf4_cpu.dequantize(nf4.packed, nf4.absmax, nf4.shape, dtype, nf4.blocksize, nf4.absmax2, nf4.offset)
        if w is not None:
            return w
    absmax = nf4.absmax
    if nf4.double_quant:
        absmax = dequantize_absmax(nf4.absmax, nf4.absmax2, nf4.offset, backend=backend)
    return dequantize_nf4(nf4.packed, absmax, nf4.shape, dtype, nf4.blocksize, backend=backend)


def dequantize_buffers_reference(nf4: NF4Buffers, dtype: torch.dtype) -> torch.Tensor:
    """Pure-torch oracle of `dequantize_buffers` (and of the Triton dequant kernel)."""
    return dequantize_buffers(nf4, dtype, backend="reference")
