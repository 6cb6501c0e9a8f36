"""NF4 dequantization on the CPU (nf4_cpu.cpp): both quantization levels in one multithreaded pass.

`dequantize` returns None where the native kernel does not apply (not a CPU tensor, an output dtype
other than float32/bfloat16, no C++ compiler): the caller then takes bitsandbytes' op or the
reference. A failed build is remembered for the process and said once (`unavailable_reason`).
"""

from __future__ import annotations

import ctypes
import functools
import math
from pathlib import Path
from typing import Optional

import torch

from qtrain_kernels import native
from qtrain_kernels import nf4_reference as ref

SOURCE = Path(__file__).with_name("nf4_cpu.cpp")
FLAGS = ("-O3", "-fopenmp", "-ffp-contract=off")
DTYPES = (torch.float32, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _lib() -> tuple[Optional[ctypes.CDLL], Optional[str]]:
    """(the loaded library, None) or (None, why not)."""
    try:
        lib = native.load(SOURCE, FLAGS)
    except native.NativeUnavailable as exc:
        return None, str(exc)
    fn = lib.qtrain_nf4_dequantize
    p = ctypes.c_void_p
    fn.argtypes = [p, p, p, p, p, ctypes.c_float, p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, p, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib, None


def unavailable_reason() -> Optional[str]:
    """None when the kernel is built and loaded (building it now if needed), else why not."""
    return _lib()[1]


@functools.lru_cache(maxsize=None)
def _tables() -> tuple[torch.Tensor, torch.Tensor]:
    """(the 16 NF4 levels, the 256-entry dynamic map), float32 CPU, kept alive for the kernel."""
    return ref._nf4_levels(torch.device("cpu")).contiguous(), ref.dynamic_map(torch.device("cpu")).contiguous()


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
               blocksize: int, absmax2: Optional[torch.Tensor] = None,
               offset: Optional[torch.Tensor] = None, simd: bool = True) -> Optional[torch.Tensor]:
    """The dense weight of `shape` in `dtype`, or None where this kernel does not apply.

    `absmax` is float32 per block, or with `absmax2` and `offset` (double quantization) the uint8
    codes they decode; values are bit-identical to `nf4_reference` (and bitsandbytes). `simd=False`
    runs the kernel's scalar loop only (what it runs on a CPU without AVX2).
    """
    tensors = [packed, absmax] + ([absmax2, offset] if absmax2 is not None else [])
    if dtype not in DTYPES or any(t.device.type != "cpu" for t in tensors):
        return None
    lib, _ = _lib()
    if lib is None:
        return None
    numel = math.prod(shape)
    if packed.numel() < (numel + 1) // 2 or absmax.numel() < -(-numel // blocksize):
        raise ValueError(f"NF4 buffers too small for shape {tuple(shape)}: {packed.numel()} bytes, "
                         f"{absmax.numel()} blocks")
    levels, code_map = _tables()
    if absmax2 is None:
        if absmax.dtype != torch.float32:
            return None
        a_f32, codes, a2, cmap, off = absmax.contiguous(), None, None, None, 0.0
    else:
        if absmax.dtype != torch.uint8 or absmax2.dtype != torch.float32:
            return None
        a_f32, codes, a2, cmap, off = None, absmax.contiguous(), absmax2.contiguous(), code_map, float(offset)
    packed = packed.contiguous()
    out = torch.empty(shape, dtype=dtype)
    done = lib.qtrain_nf4_dequantize(_ptr(packed), _ptr(a_f32), _ptr(codes), _ptr(a2), _ptr(cmap), off,
                                     _ptr(levels), numel, blocksize, int(dtype == torch.bfloat16), _ptr(out),
                                     torch.get_num_threads(), int(simd))
    return out if done == 0 else None
