"""MXFP4 (OCP microscaling FP4, E2M1 values with an E8M0 scale per 32) as GPT-OSS stores experts.

A logical ``W [..., R, K]`` is cut along K into groups of 32; ``blocks [..., R, K/32, 16]`` (uint8)
holds two 4-bit codes per byte, element 2b in the low nibble and 2b+1 in the high one;
``scales [..., R, K/32]`` (uint8) holds the exponent of each group, biased by 127.
checkpoint-formats.md §4.3. Dequantisation is exact in bf16 and fp32.
"""

from __future__ import annotations

import torch

# nibble -> value (E2M1)
FP4_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)
GROUP = 32


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[..., R, K/32, 16]`` codes and ``[..., R, K/32]`` exponents -> ``[..., R, K]``."""
    table = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    low = table[(blocks & 0x0F).long()]
    high = table[(blocks >> 4).long()]
    values = torch.stack([low, high], dim=-1).flatten(-2)  # [..., R, K/32, 32]
    scaled = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return scaled.flatten(-2).to(dtype)


# rows quantised at once: the nearest-code search holds about 74 bytes of fp32 and int64
# temporaries per weight (peak RSS at 66M weights, session 21), so a whole GPT-OSS expert stack
# at once (0.5-2.1 G weights per layer) needed tens of GB beside the model
_CHUNK_ROWS = 1024


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., R, K]`` -> (blocks, scales). Per group: exponent ``ceil(log2(amax / 6))`` over
    the finite values (clamped to [-127, 127]), then the nearest FP4 code (ties to the smaller
    magnitude) with the value's sign bit, so -0 stays -0.

    Values :func:`dequantize` cannot give back are handled so that what it does give back
    round-trips bit for bit: a finite value never takes a code that would decode past float32's
    range (it saturates to the largest finite one); ±inf takes code ±6 with an exponent of at
    least 126, which decodes to ±inf; NaN, which the format cannot hold, raises ValueError.
    Rows are quantised ``_CHUNK_ROWS`` at a time, so the temporaries stay small.
    """
    *lead, rows, cols = weight.shape
    if cols % GROUP:
        raise ValueError(f"MXFP4 needs a last dim divisible by 32, got {cols}")
    nans = int(weight.isnan().sum())
    if nans:
        raise ValueError(f"MXFP4 cannot store NaN ({nans} NaN values)")
    flat_NK = weight.reshape(-1, cols)
    n, groups = flat_NK.shape[0], cols // GROUP
    blocks = torch.empty(n, groups, GROUP // 2, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(n, groups, dtype=torch.uint8, device=weight.device)
    for start in range(0, n, _CHUNK_ROWS):
        part = slice(start, start + _CHUNK_ROWS)
        blocks[part], scales[part] = _quantize_rows(flat_NK[part])
    return blocks.reshape(*lead, rows, groups, GROUP // 2), scales.reshape(*lead, rows, groups)


def _quantize_rows(rows_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize` of ``[N, K]`` rows free of NaN."""
    n, cols = rows_NK.shape
    groups = rows_NK.float().reshape(n, cols // GROUP, GROUP)
    magnitude = groups.abs()
    infinite = magnitude.isinf()
    amax = magnitude.masked_fill(infinite, 0.0).amax(dim=-1)
    exponent = torch.where(
        amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.full_like(amax, -127)
    )
    # NOTE: 6 * 2^126 is past float32's range: ±inf is stored as ±6 at an exponent >= 126
    exponent = torch.where(infinite.any(dim=-1), exponent.clamp(min=126), exponent)
    exponent = exponent.clamp(-127, 127).to(torch.int32)
    scaled = magnitude / torch.ldexp(torch.ones_like(amax), exponent)[..., None]
    table = torch.tensor(FP4_VALUES[:8], device=rows_NK.device)
    overflows = (table * torch.exp2(exponent[..., None].float())).isinf()
    distance = (scaled[..., None] - table).abs().masked_fill(overflows[..., None, :], torch.inf)
    codes = torch.where(infinite, 7, distance.argmin(dim=-1)) + 8 * groups.signbit()
    pairs = codes.to(torch.uint8).reshape(n, cols // GROUP, GROUP // 2, 2)
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)
    return blocks, (exponent + 127).to(torch.uint8)
