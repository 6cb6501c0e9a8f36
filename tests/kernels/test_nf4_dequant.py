"""The Triton NF4 dequant is bit-exact: against the torch reference and bitsandbytes' own dequant."""

import pytest
import torch
from kernel_checks import DEVICE, make_nf4

from qtrain_kernels import dispatch
from qtrain_kernels import nf4_reference as ref
from qtrain_kernels.triton import nf4_dequant

# Odd sizes: a value count that is odd (33x7), not a multiple of the block (130x200, 1x96),
# rows that straddle quantization blocks (K=200, 96), and more than 256 blocks (second-level absmax).
SHAPES = [(64, 64), (33, 7), (130, 200), (1, 96), (300, 128)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequant_is_bit_exact_with_reference(shape, dtype, double_quant):
    nf4 = make_nf4(*shape, double_quant=double_quant, device=DEVICE, seed=shape[0])
    expected = dispatch.dequantize_buffers_reference(nf4, dtype)
    if double_quant:
        got = nf4_dequant.dequantize_nf4_double_quant(nf4.packed, nf4.absmax, nf4.absmax2, nf4.offset, shape, dtype)
    else:
        got = nf4_dequant.dequantize_nf4(nf4.packed, nf4.absmax, shape, dtype)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequant_is_bit_exact_with_bitsandbytes(dtype):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(130, 200, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    expected = bnbf.dequantize_4bit(packed, state)
    got = nf4_dequant.dequantize_nf4_double_quant(packed, state.absmax, state.state2.absmax, state.offset,
                                                  (130, 200), dtype)
    assert torch.equal(got, expected)


def test_dequant_writes_into_out_and_checks_it():
    nf4 = make_nf4(48, 64, double_quant=False, device=DEVICE)
    buf = torch.empty(48, 64, dtype=torch.bfloat16, device=DEVICE)
    out = nf4_dequant.dequantize_nf4(nf4.packed, nf4.absmax, (48, 64), torch.bfloat16, out=buf)
    assert out.data_ptr() == buf.data_ptr()
    assert torch.equal(out, ref.dequantize_nf4(nf4.packed, nf4.absmax, (48, 64), torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous"):
        nf4_dequant.dequantize_nf4(nf4.packed, nf4.absmax, (48, 64), torch.bfloat16, out=buf.t())


def test_dispatch_routes_the_triton_backend_to_the_kernel(monkeypatch):
    nf4 = make_nf4(33, 96, device=DEVICE)
    calls = []
    real = nf4_dequant._dequant_kernel
    monkeypatch.setattr(nf4_dequant, "_dequant_kernel", _Spy(real, calls))
    got = dispatch.dequantize_buffers(nf4, torch.float16, backend="triton")
    assert calls and torch.equal(got, dispatch.dequantize_buffers_reference(nf4, torch.float16))


class _Spy:
    """Wraps a kernel so a test can see that it was launched."""

    def __init__(self, kernel, calls: list) -> None:
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        self.calls.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("shape", [(48, 80), (7, 96), (130, 200)])
def test_dequant_is_within_half_a_level_of_the_weight(shape):
    """An oracle independent of any other implementation: |w − deq(q(w))| ≤ half the widest NF4
    gap × the block's absmax (+ the double-quant error of that absmax). (48, 80) and (7, 96)
    are shapes where bitsandbytes 0.50.2's CPU dequant is wrong; dispatch's bnb backend routes
    them to the reference, which this pins down."""
    from qtrain.quant.nf4 import NF4Spec, NF4Weight

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.1
    q = NF4Weight.quantize(w, NF4Spec(64, True)).to(DEVICE)
    got = nf4_dequant.dequantize_nf4_double_quant(q.packed, q.absmax, q.absmax2, q.offset, shape, torch.float32)
    via_bnb_backend = dispatch.dequantize_nf4(q.packed, q.float_absmax(), shape, torch.float32, 64, backend="bnb")
    assert torch.equal(got, via_bnb_backend)
    levels = torch.tensor(ref.NF4_LEVELS)
    half_gap = float((levels[1:] - levels[:-1]).max()) / 2
    flat = w.reshape(-1)
    blocks = torch.arange(flat.numel()) // 64
    block_absmax = torch.zeros(int(blocks.max()) + 1).scatter_reduce(0, blocks, flat.abs(), "amax")
    stored = q.float_absmax().cpu()
    allowed = half_gap * block_absmax[blocks] + (stored - block_absmax).abs()[blocks] + 1e-6
    assert torch.all((flat - got.cpu().reshape(-1)).abs() <= allowed)
