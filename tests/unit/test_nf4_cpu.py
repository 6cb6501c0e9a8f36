"""The CPU NF4 dequantization kernel (kernels/qtrain_kernels/nf4_cpu.cpp): bit-identical to the reference
and to bitsandbytes on every path (AVX2 and scalar, fp32 and bf16, one and two threads), and what
dispatch does where it does not apply."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch

from qtrain.quant.nf4 import NF4Spec, NF4Weight
from qtrain_kernels import dispatch, nf4_cpu
from qtrain_kernels import nf4_reference as ref

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or not (shutil.which("c++") or shutil.which("g++")),
                                reason="the kernel is built on Linux with the system's C++ compiler")

SHAPES = [(96, 128), (7, 130), (3, 5), (1, 1), (33, 64), (80, 96)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _weight(shape, blocksize: int, double_quant: bool, seed: int = 0) -> NF4Weight:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 3
    return NF4Weight.quantize(w, NF4Spec(blocksize=blocksize, double_quant=double_quant))


def _native(q: NF4Weight, dtype: torch.dtype, simd: bool = True) -> torch.Tensor:
    out = nf4_cpu.dequantize(q.packed, q.absmax, q.shape, dtype, q.spec.blocksize, q.absmax2, q.offset, simd=simd)
    assert out is not None, nf4_cpu.unavailable_reason()
    return out


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_to_the_reference_on_the_simd_and_the_scalar_path(double_quant, blocksize, dtype):
    for i, shape in enumerate(SHAPES):
        q = _weight(shape, blocksize, double_quant, seed=i)
        want = ref.dequantize_nf4(q.packed, q.float_absmax("reference"), q.shape, dtype, blocksize)
        for simd in (True, False):
            got = _native(q, dtype, simd)
            assert got.shape == want.shape and got.dtype == dtype
            assert torch.equal(_bits(got), _bits(want)), (shape, simd)


def test_bit_identical_to_bitsandbytes_op_on_a_model_sized_weight():
    op = dispatch._bnb_op("dequantize_4bit")
    if op is None:
        pytest.skip("bitsandbytes' op is not registered")
    q = _weight((2752, 1024), 64, True)
    absmax = dispatch.dequantize_absmax(q.absmax, q.absmax2, q.offset)
    want = op.default(q.packed, absmax, 64, "nf4", list(q.shape), torch.float32)
    assert torch.equal(_bits(_native(q, torch.float32)), _bits(want))


def test_thread_count_does_not_change_a_value():
    q = _weight((512, 1024), 64, True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _native(q, torch.float32)
        torch.set_num_threads(2)
        two = _native(q, torch.float32)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(_bits(one), _bits(two))


def test_nan_and_inf_scales_decode_as_the_reference_does():
    q = _weight((4, 64), 64, False)
    q.qabsmax.data[1] = float("inf")
    q.qabsmax.data[2] = float("nan")
    for dtype in (torch.float32, torch.bfloat16):
        want = ref.dequantize_nf4(q.packed, q.absmax, q.shape, dtype, 64)
        for simd in (True, False):
            got = _native(q, dtype, simd)
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
            finite = want.isfinite()
            assert torch.equal(_bits(got[finite]), _bits(want[finite]))


def test_dispatch_takes_it_on_cpu_and_falls_back_where_it_does_not_apply(monkeypatch):
    q = _weight((64, 128), 64, True)
    calls = []
    real = nf4_cpu.dequantize
    monkeypatch.setattr(nf4_cpu, "dequantize", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    want = ref.dequantize_nf4(q.packed, q.float_absmax("reference"), q.shape, torch.float32, 64)
    assert torch.equal(q.dequantize("bnb"), want) and calls == [torch.float32]
    assert torch.equal(q.dequantize("reference"), want) and len(calls) == 1  # the oracle stays pure torch
    half = dispatch.dequantize_buffers(q.kernel_buffers(), torch.float16, backend="bnb")  # not the kernel's: bnb's op
    assert calls[-1] == torch.float16 and torch.equal(half, want.half())


def test_a_failed_build_falls_back_to_bitsandbytes_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("QTRAIN_KERNEL_CACHE", str(tmp_path))
    nf4_cpu._lib.cache_clear()
    try:
        q = _weight((64, 128), 64, True)
        assert nf4_cpu.dequantize(q.packed, q.absmax, q.shape, torch.float32, 64, q.absmax2, q.offset) is None
        assert "no-such-compiler" in nf4_cpu.unavailable_reason()
        want = ref.dequantize_nf4(q.packed, q.float_absmax("reference"), q.shape, torch.float32, 64)
        assert torch.equal(q.dequantize("bnb"), want)
        assert not list(tmp_path.glob("*.so"))
    finally:
        nf4_cpu._lib.cache_clear()


def test_buffers_too_small_for_the_shape_are_refused():
    q = _weight((8, 64), 64, False)
    with pytest.raises(ValueError, match="too small for shape"):
        nf4_cpu.dequantize(q.packed, q.absmax, (16, 64), torch.float32, 64)
