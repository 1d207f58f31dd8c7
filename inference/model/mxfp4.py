"""MXFP4 as pure tensor functions: decode ``(blocks, scales) -> Tensor`` and its inverse, nothing else.

The layout is the one openai/gpt-oss checkpoints ship (OCP Microscaling, MXFP4 flavour):

- ``blocks``: ``uint8`` of shape ``(..., G, 16)``; each byte holds two e2m1 codes, the low nibble first.
  One group of 32 values is one row of 16 bytes.
- ``scales``: ``uint8`` of shape ``(..., G)``: an E8M0 exponent with bias 127 shared by the 32 values of a group.

Decoding gives ``(..., G * 32)``: code value times ``2 ** (scale - 127)`` with ``ldexp`` semantics, as gpt-oss's
reference decoder (``torch.ldexp``) computes it, for every byte: exact wherever the product is a float (byte 0 is
``2 ** -127``, subnormal results included), ``inf`` only where it overflows, and a zero code stays zero (byte 255 is
``2 ** 128``, which no float32 holds on its own). No I/O and no modules here: checkpoint naming lives in
``inference.model.checkpoint``.

Encoding (:func:`pack`) rounds each element to the nearest e2m1 value (ties to even, saturating at 6) and picks the
group's shared scale by one of :data:`SCALE_ROUNDINGS`:

- ``"down"``: the OCP MX rule, ``2 ** (floor(log2(amax)) - 2)``; magnitudes above 6 after scaling saturate to 6.
- ``"up"``: gpt-oss's and transformers' quantizers, the smallest power of two with ``amax / scale <= 6``
  (``2 ** ceil(log2(amax / 6))``): nothing saturates, small values get a coarser grid. It is the down scale or twice
  it; the two differ in a third or more of the groups (30% of Gaussian groups, 44% of Student-t ones), and neither
  has the lower error on all data.
- ``"best"``: per group, whichever of the two has the lower squared error (ties go down), so never worse than either.

:func:`pack_with_stats` also says what each convention would have cost (the requantization reports use it).

Training holds packed experts as a tensor subclass PEFT can wrap (``finetune.kernels.packed.Mxfp4Weight``); it
decodes with :func:`decode`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from inference.model.compiled import fused

# The 16 e2m1 values, indexed by their 4-bit code (bit 3 is the sign).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
GROUP = 32          # values sharing one scale
E2M1_EMAX = 2       # exponent of the largest e2m1 normal (6 = 1.5 * 2**2)
E2M1_MAX = 6.0
SCALE_BIAS = 127
SCALE_ROUNDINGS = ("down", "up", "best")
PACK_CHUNK_GROUPS = 1 << 16   # groups quantized at a time (2M values): pack's temporaries stay below ~200 MB

# Rounding |x| (already divided by the group scale) to the e2m1 magnitude codes 0..7, round-to-nearest-even:
# (threshold, ties go up). A tie goes to the neighbour whose code is even (mantissa bit 0).
_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """``2.0 ** k`` as float32 for int32 ``k`` in [-126, 127], built from its bits: exact, whatever exp2 does."""
    return ((k + 127) << 23).view(torch.float32)


def _pow2_pair(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two normal float32 powers of two whose product is ``2 ** k`` (int32 ``k`` in [-252, 252]).

    ``2 ** 128`` (scale byte 255) is no float32 and ``2 ** -127`` (byte 0) is subnormal, while the halves
    ``floor(k / 2)`` and ``k - floor(k / 2)`` are ordinary floats. For ``v`` with few significant bits (an e2m1 value)
    ``v * lo`` is exact and ``* hi`` rounds once: ``ldexp(v, k)`` bit for bit, overflow to inf, 0 stays 0.
    """
    half = k >> 1                                  # floor(k / 2): an arithmetic shift rounds towards -inf
    return _pow2(half), _pow2(k - half)


def _ldexp(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``x * 2 ** k`` in float32 (``k`` int32, broadcast), exact for e2m1 values and for results >= 2**-126."""
    lo, hi = _pow2_pair(k)
    return x * lo * hi


@functools.lru_cache(maxsize=8)
def _byte_lut(dtype: torch.dtype, device) -> torch.Tensor:
    """``(256, 2)``: the two e2m1 values of every byte, low nibble first (built once per dtype and device: a forward
    decodes thousands of experts)."""
    fp4 = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = torch.arange(256)
    return torch.stack((fp4[codes & 0x0F], fp4[codes >> 4]), dim=-1).to(dtype=dtype, device=device)


def unpack(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode MXFP4 ``blocks (..., G, 16)`` + ``scales (..., G)`` into ``(..., G * 32)`` of ``dtype``.

    One gather per byte (two values) and a multiply by ``2 ** (scale - 127)`` as two finite powers of two
    (:func:`_pow2_pair`): ``ldexp`` bit for bit in float32 and bfloat16, which share float32's exponent range (so the
    work happens in ``dtype`` itself); other dtypes go through float32.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != GROUP // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 shapes do not match: blocks {tuple(blocks.shape)}, scales {tuple(scales.shape)}")
    work = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
    values = _byte_lut(work, blocks.device)[blocks.int()]                              # (..., G, 16, 2)
    lo, hi = (p.to(work)[..., None, None] for p in _pow2_pair(scales.to(torch.int32) - SCALE_BIAS))  # (..., G, 1, 1)
    return values.mul_(lo).mul_(hi).flatten(-3).to(dtype)


@dataclass(frozen=True)
class PackStats:
    """What quantizing one tensor cost under each scale rounding, summed over the tensor in float64.

    ``sq_error*`` are ``sum((Q(x) - x) ** 2)``: with the rounding used, and with pure ``down`` and pure ``up``.
    ``best`` takes, group by group, the smaller of the two, so its sum is never above either (the sums run over the
    same groups in the same order, and rounded addition is monotone).
    """

    scale_rounding: str
    groups: int
    differ: int           # groups where the down and up scales differ (elsewhere the three roundings agree)
    took_up: int          # groups encoded with the up scale where it differs from the down one
    sq_norm: float        # sum(x ** 2)
    sq_error: float
    sq_error_down: float
    sq_error_up: float

    def rel_error(self, rounding: str | None = None) -> float:
        """``||Q(x) - x|| / ||x||`` with the rounding used, or with ``"down"`` / ``"up"``."""
        if rounding in (None, self.scale_rounding):
            sq = self.sq_error
        else:
            sq = {"down": self.sq_error_down, "up": self.sq_error_up}[rounding]
        return math.sqrt(sq / self.sq_norm) if self.sq_norm > 0 else 0.0

    @classmethod
    def combine(cls, parts: list["PackStats"]) -> "PackStats":
        """The stats of a tensor packed in parts (one rounding): counts and squared sums add up."""
        rounding = {p.scale_rounding for p in parts}
        if len(rounding) != 1:
            raise ValueError(f"cannot combine stats of different scale roundings: {sorted(rounding)}")
        return cls(rounding.pop(), *(sum(getattr(p, f) for p in parts) for f in (
            "groups", "differ", "took_up", "sq_norm", "sq_error", "sq_error_down", "sq_error_up")))

    @property
    def up_share(self) -> float:
        return self.took_up / self.groups if self.groups else 0.0

    @property
    def differ_share(self) -> float:
        return self.differ / self.groups if self.groups else 0.0


def pack(values: torch.Tensor, scale_rounding: str = "down") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``(..., K)`` (K a multiple of 32) to MXFP4 ``blocks (..., K/32, 16)`` and ``scales (..., K/32)``.

    Each element is rounded to the nearest e2m1 value with ties to even, magnitudes beyond 6 saturating to 6; the
    shared scale of each group of 32 follows ``scale_rounding`` (see the module docstring): ``"down"`` (the OCP MX
    rule, the default), ``"up"`` (gpt-oss's and transformers' quantizers) or ``"best"`` (the lower-error of the two,
    per group). An all-zero group gets scale byte 127. Inputs must be finite.
    """
    blocks, scales, _ = _pack(values, scale_rounding, measure=False)
    return blocks, scales


def pack_with_stats(values: torch.Tensor, scale_rounding: str = "best"
                    ) -> tuple[torch.Tensor, torch.Tensor, PackStats]:
    """:func:`pack`, plus the squared errors of the rounding used and of both conventions (:class:`PackStats`)."""
    return _pack(values, scale_rounding, measure=True)


def _pack(values: torch.Tensor, scale_rounding: str, measure: bool):
    if scale_rounding not in SCALE_ROUNDINGS:
        raise ValueError(f"scale_rounding must be one of {SCALE_ROUNDINGS}, got {scale_rounding!r}")
    if values.shape[-1] % GROUP:
        raise ValueError(f"last dimension must be a multiple of {GROUP}, got {values.shape[-1]}")
    lead, groups_per_row = values.shape[:-1], values.shape[-1] // GROUP
    groups = values.detach().reshape(-1, GROUP)               # (N, 32): a view of contiguous values, else one copy
    n = groups.shape[0]
    blocks = torch.empty(n, GROUP // 2, dtype=torch.uint8, device=values.device)
    scales = torch.empty(n, dtype=torch.uint8, device=values.device)
    totals = [0] * 3 + [0.0] * 4                              # groups, differ, took_up, sq_norm, sq_error, down, up
    # a GPU wants bigger chunks (each chunk syncs once for its sums); 16x is ~3 GB of temporaries at most
    step = PACK_CHUNK_GROUPS * (16 if values.device.type == "cuda" else 1)
    for start in range(0, n, step):
        chunk = slice(start, start + step)
        code, shared, sums = _pack_groups(groups[chunk].to(torch.float32), scale_rounding, measure)
        blocks[chunk] = code[:, 0::2] | (code[:, 1::2] << 4)  # low nibble first
        scales[chunk] = (shared + SCALE_BIAS).to(torch.uint8)
        if measure:
            totals = [t + s for t, s in zip(totals, sums)]
    blocks, scales = blocks.reshape(*lead, groups_per_row, GROUP // 2), scales.reshape(*lead, groups_per_row)
    return blocks, scales, PackStats(scale_rounding, *totals) if measure else None


def scale_rule(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared exponents ``(down, up)`` int32 the two conventions give groups of largest magnitude ``amax``
    (float32, finite): down, the OCP rule ``floor(log2(amax)) - 2`` (0 for an all-zero group); up, the smallest
    with ``amax / 2**up <= 6``."""
    _, e = torch.frexp(amax)                      # amax = m * 2**e, m in [0.5, 1): floor(log2(amax)) = e - 1
    down = torch.where(amax > 0, (e - 1 - E2M1_EMAX).clamp(-SCALE_BIAS, SCALE_BIAS), 0)
    # amax / 2**down is in [4, 8) (below 4 only when clamped at 2**-127): the up scale is the down one, or twice it
    # when that ratio is above 6. The ratio is exact (a power-of-two scaling of a normal float).
    up = (down + (_ldexp(amax, -down) > E2M1_MAX).to(torch.int32)).clamp(max=SCALE_BIAS)
    return down, up


def _pack_groups(x: torch.Tensor, rounding: str, measure: bool):
    """Codes ``(n, 32)`` uint8 and shared exponents ``(n,)`` int32 of float32 groups ``x (n, 32)``; with ``measure``,
    the sums that make :class:`PackStats` (in its field order, after ``scale_rounding``)."""
    amax = x.abs().amax(dim=-1)                                                         # (n,)
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("cannot quantize inf or NaN to MXFP4")
    down, up = scale_rule(amax)
    if rounding == "down" and not measure:
        return _encode(x, down), down, None
    if rounding == "up" and not measure:
        return _encode(x, up), up, None
    code_down, code_up = _encode(x, down), _encode(x, up)
    err_down, err_up = _sq_error(x, code_down, down), _sq_error(x, code_up, up)           # (n,) float64
    if rounding == "best":
        take_up = err_up < err_down                          # ties (and groups where up == down) keep the down scale
    else:
        take_up = torch.full_like(down, rounding == "up", dtype=torch.bool)
    shared = torch.where(take_up, up, down)
    code = torch.where(take_up[:, None], code_up, code_down)
    if not measure:
        return code, shared, None
    err = torch.where(take_up, err_up, err_down)
    sums = (x.shape[0], int((up != down).sum()), int((shared != down).sum()), float(x.double().square().sum()),
            float(err.sum()), float(err_down.sum()), float(err_up.sum()))
    return code, shared, sums


def _encode(x: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """e2m1 codes ``(n, 32)`` (bit 3 the sign, -0.0 included) of ``x (n, 32) / 2 ** shared (n,)``: round to nearest
    even, saturating at 6."""
    scaled = _ldexp(x, -shared[:, None])       # exact wherever |scaled| >= 2**-126, hence at every threshold
    mag = scaled.abs()
    code = torch.zeros_like(mag, dtype=torch.uint8)
    for threshold, ties_up in _THRESHOLDS:
        code += (mag >= threshold if ties_up else mag > threshold).to(torch.uint8)
    return code | (torch.signbit(scaled).to(torch.uint8) << 3)


def _sq_error(x: torch.Tensor, code: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """Per group ``sum((Q(x) - x) ** 2)`` ``(n,)`` in float64, exact up to the summation's rounding: ``x - q`` is exact
    in float32 (``q`` is 0, or within a factor 2 of ``x``: Sterbenz) and its square exact in float64 (48 bits)."""
    table = torch.tensor(FP4_VALUES, dtype=torch.float32, device=x.device)
    q = _ldexp(table[code.int()], shared[:, None])                                     # (n, 32) decoded, exact
    return (x - q).double().square().sum(dim=-1)


@fused
def decode(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`unpack` as one elementwise expression (one fused kernel on CUDA: packed bytes in, ``dtype`` out).

    Each 4-bit code is ``sign | e (2 bits) | m (1 bit)``: ``0.5 m`` when ``e = 0``, else ``(1 + 0.5 m) 2^(e-1)``,
    times the group's ``2^(scale - 127)`` as two finite powers of two (:func:`_pow2_pair`, so byte 255 overflows
    only where the product does and a zero stays zero). ``ldexp`` bit for bit in float32 and bfloat16.
    """
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).to(torch.int32)        # (..., G, 16, 2)
    e = (codes >> 1) & 3
    m = (codes & 1).to(torch.float32)
    mag = torch.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * torch.exp2((e - 1).to(torch.float32)))
    lo, hi = (p[..., None, None] for p in _pow2_pair(scales.to(torch.int32) - SCALE_BIAS))   # (..., G, 1, 1) each
    # the sign rides on the nonzero scale: Triton (so inductor) negates as 0 - x, and -mag would lose code 8's -0.0
    value = mag * torch.where((codes & 8) != 0, -lo, lo) * hi
    return value.to(dtype).flatten(-3)                                                # (..., G * 32)
