"""NF4 storage: our bytes are bitsandbytes' bytes; our torch reference agrees with bitsandbytes."""

import pytest
import torch

bnbf = pytest.importorskip("bitsandbytes.functional")

from qtrain.quant.nf4 import NF4Spec, NF4Weight  # noqa: E402
from qtrain_kernels import dispatch  # noqa: E402
from qtrain_kernels import nf4_reference as ref  # noqa: E402

SHAPES = [(64, 64), (128, 200), (33, 7), (256, 1000), (1, 64)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _bnb(w: torch.Tensor, double_quant: bool = True):
    return bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_stored_bytes_equal_bitsandbytes(shape, dtype):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype) * 0.02
    packed, state = _bnb(w)
    ours = NF4Weight.quantize(w, NF4Spec(64, True))
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.absmax2, state.state2.absmax)
    assert torch.equal(ours.offset, state.offset.reshape(()))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_packing_is_bit_exact(shape, dtype):
    """The 4-bit codes and float absmax of the pure-torch reference equal bitsandbytes'."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    packed, state = _bnb(w, double_quant=False)
    ref_packed, ref_absmax = ref.quantize_nf4(w, 64)
    assert torch.equal(ref_packed, packed)
    assert torch.equal(ref_absmax, state.absmax)


def test_dynamic_map_equals_bitsandbytes():
    assert torch.equal(ref.dynamic_map(), bnbf.create_dynamic_map(signed=True))


def test_reference_double_quant_picks_nearest_level():
    """Where our absmax codes differ from bitsandbytes' native CPU search, ours is the nearer level.

    bitsandbytes' CPU quantizer uses an approximate binary search; the reference picks the true
    nearest level. They must agree almost everywhere and never be worse.
    """
    absmax = torch.rand(200_000, generator=torch.Generator().manual_seed(3)) * 0.1
    offset = absmax.mean()
    theirs, st = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
    ours, ours_absmax2 = ref.quantize_blockwise_8bit(absmax - offset, 256)
    assert torch.equal(ours_absmax2, st.absmax)
    code = ref.dynamic_map()
    normed = (absmax - offset) / st.absmax.repeat_interleave(256)[: absmax.numel()]
    diff = ours != theirs
    assert diff.float().mean() < 0.01
    err_ours = (normed - code[ours.long()]).abs()
    err_theirs = (normed - code[theirs.long()]).abs()
    assert torch.all(err_ours[diff] <= err_theirs[diff])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["reference", "bnb"])
def test_dequant_equals_bitsandbytes(shape, dtype, backend):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    packed, state = _bnb(w)
    expected = bnbf.dequantize_4bit(packed, state)
    nf4 = NF4Weight.quantize(w, NF4Spec(64, True))
    got = dispatch.dequantize_nf4(nf4.packed, nf4.float_absmax(), nf4.shape, dtype, 64, backend=backend)
    assert got.dtype == dtype
    assert torch.equal(got, expected)


def test_reference_dequant_reuses_output_buffer():
    w = torch.randn(96, 128)
    nf4 = NF4Weight.quantize(w, NF4Spec(64, False))
    buf = torch.empty(96, 128, dtype=torch.bfloat16)
    out = ref.dequantize_nf4(nf4.packed, nf4.absmax, (96, 128), torch.bfloat16, 64, out=buf)
    assert out.data_ptr() == buf.data_ptr()
    assert torch.equal(out, nf4.dequantize("reference").to(torch.bfloat16))


@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_error_is_within_half_a_level(double_quant):
    """|w - deq(q(w))| is at most half the widest NF4 gap times the block absmax (+ absmax error)."""
    w = torch.randn(512, 256, generator=torch.Generator().manual_seed(5))
    nf4 = NF4Weight.quantize(w, NF4Spec(64, double_quant))
    deq = nf4.dequantize("reference")
    levels = torch.tensor(ref.NF4_LEVELS)
    half_gap = float((levels[1:] - levels[:-1]).max()) / 2
    block_absmax = w.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    err = (w - deq).reshape(-1, 64).abs()
    absmax_err = (nf4.float_absmax() - block_absmax.squeeze(1)).abs().unsqueeze(1)
    assert torch.all(err <= half_gap * block_absmax + absmax_err + 1e-6)
    # and the quantization is not trivially lossless or broken: mean relative error is NF4-like
    rel = float((w - deq).abs().mean() / w.abs().mean())
    assert 0.01 < rel < 0.15


def test_storage_is_about_half_a_byte_per_weight():
    nf4 = NF4Weight.quantize(torch.randn(1024, 1024), NF4Spec(64, True))
    bytes_per_param = nf4.nbytes() / (1024 * 1024)
    assert 0.5 < bytes_per_param < 0.52  # 0.5 packed + 1/64 absmax code + tiny second level
