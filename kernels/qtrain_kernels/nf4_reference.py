"""NF4 quantization in pure torch, byte-compatible with bitsandbytes.

Layout (what bitsandbytes' `quantize_4bit(..., quant_type="nf4")` stores):
- the weight is flattened row-major and cut into blocks of `blocksize` values;
- each block is scaled by its absmax into [-1, 1] and each value is rounded to the nearest of
  the 16 NF4 levels (ties go to the lower level: bucketize against the midpoints);
- two 4-bit codes per byte, the *first* value in the high nibble; shape (numel // 2, 1);
- with double quantization the float32 absmax vector has its mean subtracted (`offset`) and is
  itself quantized blockwise (blocksize 256) to uint8 with the signed 8-bit "dynamic" map.

These functions are the reference every fused kernel is tested against; `dequantize_nf4` is
also the CPU fast path (a 256-entry byte→pair table instead of two nibble lookups).
"""

from __future__ import annotations

import functools

import torch

# The 16 NF4 levels (quantiles of N(0, 1) normalised to [-1, 1], QLoRA paper, appendix E).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

ABSMAX_BLOCKSIZE = 256


@functools.lru_cache(maxsize=None)
def _nf4_levels(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _byte_pairs(device: torch.device) -> torch.Tensor:
    """(256, 2) float32: the two NF4 values a packed byte decodes to, high nibble first."""
    levels = _nf4_levels(device)
    byte = torch.arange(256, device=device)
    return torch.stack([levels[byte >> 4], levels[byte & 0xF]], dim=1).contiguous()


@functools.lru_cache(maxsize=None)
def dynamic_map(device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """The signed 8-bit dynamic-exponent map (Dettmers 2015) used for the absmax of the absmax.

    For exponent e = 0..6 the fraction range [0.1, 1] is split into 2**e equal bins whose
    midpoints, times 10**(e-6), give 2**e positive and 2**e negative levels (254 in all);
    0 and 1 complete the 256. Every step is float32 arithmetic, so the levels are
    bit-identical to bitsandbytes' `create_dynamic_map(signed=True)` (tested).
    """
    values: list[float] = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (e - 6)
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def _scale_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax scaling to [-1, 1]; returns (scaled values, float32 absmax)."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return scaled, absmax


def _nearest(scaled: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    midpoints = (levels[:-1] + levels[1:]) / 2
    return torch.bucketize(scaled, midpoints, out_int32=True)


def quantize_blockwise_8bit(values: torch.Tensor, blocksize: int = ABSMAX_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize float values to uint8 codes of the dynamic map; returns (codes, float32 absmax).

    Rounding: divide by the block absmax, take the level at or left of the value, move right
    only when that level is strictly closer (the true nearest level, ties to the lower one).
    """
    flat = values.reshape(-1).float()
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    normed = (blocks / absmax.unsqueeze(1)).reshape(-1)[:n]
    code = dynamic_map(values.device)
    left = (torch.searchsorted(code, normed, right=True) - 1).clamp_(0, code.numel() - 2)
    closer_right = (normed - code[left + 1]).abs() < (normed - code[left]).abs()
    return (left + closer_right).to(torch.uint8), absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = ABSMAX_BLOCKSIZE) -> torch.Tensor:
    values = dynamic_map(codes.device)[codes.reshape(-1).long()]
    n = values.numel()
    pad = (-n) % blocksize
    scaled = torch.nn.functional.pad(values, (0, pad)).view(-1, blocksize) * absmax.unsqueeze(1)
    return scaled.reshape(-1)[:n]


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float tensor to packed NF4; returns (packed uint8 (numel//2, 1), float32 absmax)."""
    scaled, absmax = _scale_blocks(weight.reshape(-1).float(), blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = _nearest(scaled, _nf4_levels(weight.device)).to(torch.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)
    return packed, absmax


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    blocksize: int = 64,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed NF4 + float32 absmax → tensor of `shape` in `dtype` (math in float32, then cast).

    `out`, if given, is a reusable buffer of `shape` and `dtype` that receives the result.
    """
    n = 1
    for s in shape:
        n *= s
    pairs = _byte_pairs(packed.device)
    values = pairs.index_select(0, packed.reshape(-1).to(torch.int32)).reshape(-1)[:n]
    full = n - n % blocksize
    if full == n:
        scaled = values.view(-1, blocksize).mul_(absmax.view(-1, 1)).view(shape)
    else:
        scaled = values.clone()
        scaled[:full] = (values[:full].view(-1, blocksize) * absmax[: full // blocksize].view(-1, 1)).view(-1)
        scaled[full:] = values[full:] * absmax[-1]
        scaled = scaled.view(shape)
    if out is None:
        return scaled if dtype == torch.float32 else scaled.to(dtype)
    out.copy_(scaled)
    return out


def double_quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 absmax → (uint8 codes, float32 absmax of blocks of 256, float32 scalar offset)."""
    offset = absmax.mean()
    codes, absmax2 = quantize_blockwise_8bit(absmax - offset, ABSMAX_BLOCKSIZE)
    return codes, absmax2, offset


def dequantize_absmax(codes: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return dequantize_blockwise_8bit(codes, absmax2, ABSMAX_BLOCKSIZE) + offset
