"""MXFP4 as pure tensor functions: decode ``(blocks, scales) -> Tensor`` and its inverse, nothing else.

The layout is the one openai/gpt-oss checkpoints ship (OCP Microscaling, MXFP4 flavour):

- ``blocks``: ``uint8`` of shape ``(..., G, 16)``; each byte holds two e2m1 codes, the low nibble first.
  One group of 32 values is one row of 16 bytes.
- ``scales``: ``uint8`` of shape ``(..., G)``: an E8M0 exponent with bias 127 shared by the 32 values of a group.

Decoding gives ``(..., G * 32)``. No I/O and no modules here: checkpoint naming lives in ``inference.checkpoint``.
"""

from __future__ import annotations

import torch

# The 16 e2m1 values, indexed by their 4-bit code (bit 3 is the sign).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
GROUP = 32          # values sharing one scale
E2M1_EMAX = 2       # exponent of the largest e2m1 normal (6 = 1.5 * 2**2)
SCALE_BIAS = 127

# Rounding |x| (already divided by the group scale) to the e2m1 magnitude codes 0..7, round-to-nearest-even:
# (threshold, ties go up). A tie goes to the neighbour whose code is even (mantissa bit 0).
_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def _byte_lut(dtype: torch.dtype, device) -> torch.Tensor:
    """``(256, 2)``: the two e2m1 values of every byte, low nibble first."""
    fp4 = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = torch.arange(256)
    return torch.stack((fp4[codes & 0x0F], fp4[codes >> 4]), dim=-1).to(dtype=dtype, device=device)


def unpack(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode MXFP4 ``blocks (..., G, 16)`` + ``scales (..., G)`` into ``(..., G * 32)`` of ``dtype``.

    One gather per byte (two values) and one multiply by ``2 ** (scale - 127)``: exact in float32 and bfloat16, which
    share float32's exponent range (so the work happens in ``dtype`` itself); other dtypes go through float32.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != GROUP // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 shapes do not match: blocks {tuple(blocks.shape)}, scales {tuple(scales.shape)}")
    work = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
    values = _byte_lut(work, blocks.device)[blocks.int()]                              # (..., G, 16, 2)
    exponent = (scales.to(torch.int32) - SCALE_BIAS).to(torch.float32)                 # (..., G)
    scale = torch.exp2(exponent).to(work)[..., None, None]                             # (..., G, 1, 1)
    return (values * scale).flatten(-3).to(dtype)


def pack(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``(..., K)`` (K a multiple of 32) to MXFP4 ``blocks (..., K/32, 16)`` and ``scales (..., K/32)``.

    The MX rules: the shared scale is ``2 ** (floor(log2(amax)) - 2)`` per group of 32, each element is rounded to
    the nearest e2m1 value with ties to even, and magnitudes beyond 6 saturate to 6.
    """
    if values.shape[-1] % GROUP:
        raise ValueError(f"last dimension must be a multiple of {GROUP}, got {values.shape[-1]}")
    x = values.detach().to(torch.float32).reshape(*values.shape[:-1], -1, GROUP)   # (..., G, 32)
    amax = x.abs().amax(dim=-1)                                                     # (..., G)
    _, e = torch.frexp(amax)                       # amax = m * 2**e, m in [0.5, 1): floor(log2(amax)) = e - 1
    shared = (e - 1 - E2M1_EMAX).clamp(-SCALE_BIAS, SCALE_BIAS)
    shared = torch.where(amax > 0, shared, torch.zeros_like(shared))
    scaled = torch.ldexp(x, (-shared).unsqueeze(-1).to(torch.float32))
    mag = scaled.abs()
    code = torch.zeros_like(mag, dtype=torch.uint8)
    for threshold, ties_up in _THRESHOLDS:
        code += (mag >= threshold if ties_up else mag > threshold).to(torch.uint8)
    code |= (torch.signbit(scaled).to(torch.uint8) << 3)
    code = code.reshape(*code.shape[:-1], GROUP // 2, 2)                            # (..., G, 16, 2)
    blocks = code[..., 0] | (code[..., 1] << 4)
    scales = (shared + SCALE_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()
