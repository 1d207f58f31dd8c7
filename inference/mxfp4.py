"""MXFP4 as pure tensor functions: decode ``(blocks, scales) -> Tensor`` and its inverse, nothing else.

The layout is the one openai/gpt-oss checkpoints ship (OCP Microscaling, MXFP4 flavour):

- ``blocks``: ``uint8`` of shape ``(..., G, 16)``; each byte holds two e2m1 codes, the low nibble first.
  One group of 32 values is one row of 16 bytes.
- ``scales``: ``uint8`` of shape ``(..., G)``: an E8M0 exponent with bias 127 shared by the 32 values of a group.

Decoding gives ``(..., G * 32)``. No I/O and no modules here: checkpoint naming lives in ``inference.checkpoint``.

:class:`Mxfp4Weight` holds a packed expert tensor where a model expects a dense ``(E, in, out)`` weight (transformers'
``GptOssExperts`` parameters), so PEFT can wrap it and the training path can hand the packed bytes to the expert
matmul (``inference.moe``), which decodes them piecewise. Any other use of it decodes the whole tensor first: slow,
but every library that touches the weight sees the right values.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from inference.kernels import fused

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


@fused
def decode(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`unpack` as one elementwise expression (one fused kernel on CUDA: packed bytes in, ``dtype`` out).

    Each 4-bit code is ``sign | e (2 bits) | m (1 bit)``: ``0.5 m`` when ``e = 0``, else ``(1 + 0.5 m) 2^(e-1)``,
    times the group's ``2^(scale - 127)``. Exact in float32 and bfloat16.
    """
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).to(torch.int32)        # (..., G, 16, 2)
    e = (codes >> 1) & 3
    m = (codes & 1).to(torch.float32)
    mag = torch.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * torch.exp2((e - 1).to(torch.float32)))
    value = torch.where((codes & 8) != 0, -mag, mag)
    value = value * torch.exp2(scales.to(torch.float32) - SCALE_BIAS)[..., None, None]
    return value.to(dtype).flatten(-3)                                                # (..., G * 32)


class Mxfp4Weight(torch.Tensor):
    """A frozen expert weight ``(E, in, out)`` of ``dtype`` stored as MXFP4 ``blocks (E, out, in/32, 16)`` and
    ``scales (E, out, in/32)`` (the checkpoint's layout: rows are output features).

    A tensor subclass (the way torchao holds its quantized weights): it reports the dense shape and dtype, so
    ``nn.Parameter``, PEFT's ``target_parameters`` and ``module.to`` work on it unchanged, while only the packed bytes
    (4.25 bits per weight) are in memory. Detaching, copying and moving keep it packed; any other operation sees
    the decoded dense tensor.
    """

    blocks: torch.Tensor
    scales: torch.Tensor

    @staticmethod
    def __new__(cls, blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        experts, out, groups, half = blocks.shape
        if half != GROUP // 2 or scales.shape != blocks.shape[:-1]:
            raise ValueError(f"MXFP4 shapes do not match: blocks {tuple(blocks.shape)}, scales {tuple(scales.shape)}")
        return torch.Tensor._make_wrapper_subclass(cls, (experts, groups * GROUP, out), dtype=dtype,
                                                   device=blocks.device, requires_grad=False)

    def __init__(self, blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        self.blocks, self.scales = blocks, scales

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``(E, in, out)`` tensor (a transposed view of the decoded ``(E, out, in)``)."""
        return decode(self.blocks, self.scales, dtype or self.dtype).transpose(-2, -1)

    @property
    def packed_bytes(self) -> int:
        return self.blocks.numel() + self.scales.numel()

    def __repr__(self) -> str:   # printing must not decode gigabytes
        return f"Mxfp4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    def __tensor_flatten__(self):
        return ["blocks", "scales"], self.dtype

    @staticmethod
    def __tensor_unflatten__(inner, dtype, outer_size, outer_stride):
        return Mxfp4Weight(inner["blocks"], inner["scales"], dtype)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func in (aten.detach.default, aten.alias.default):
            w = args[0]
            return Mxfp4Weight(w.blocks, w.scales, w.dtype)
        if func is aten.clone.default:
            w = args[0]
            return Mxfp4Weight(w.blocks.clone(), w.scales.clone(), w.dtype)
        if func is aten._to_copy.default:
            w = args[0]
            device = kwargs.get("device") or w.device
            return Mxfp4Weight(w.blocks.to(device), w.scales.to(device), kwargs.get("dtype") or w.dtype)

        def dense(t):
            return t.dequantize() if isinstance(t, Mxfp4Weight) else t
        return func(*tree_map(dense, args), **tree_map(dense, kwargs))
