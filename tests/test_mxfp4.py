"""Tests for inference.model.mxfp4: decoding against transformers' own MXFP4 dequantizer, known bytes and
``math.ldexp`` for every scale byte and code; the encoder's two scale conventions byte for byte against an
independent per-group reference written from the OCP MX spec, and ``"best"`` against both, on seeded data."""

from __future__ import annotations

import math

import pytest
import torch

from finetune.kernels.packed import Mxfp4Weight
from inference.model import mxfp4
from inference.model.mxfp4 import pack, pack_with_stats, unpack

# OCP Microscaling spec, e2m1: codes 0..7 are these magnitudes; bit 3 is the sign.
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
U = 2.0 ** -53   # float64 unit roundoff: the only rounding in the error sums compared below


def e2m1(code: int) -> float:
    return -E2M1[code & 7] if code & 8 else E2M1[code & 7]


def random_mx(e=3, rows=64, groups=4, lo=115, hi=135, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (e, rows, groups, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(lo, hi + 1, (e, rows, groups), generator=g, dtype=torch.uint8)
    return blocks, scales


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16}[t.dtype])


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit (so -0.0 is not 0.0 and inf is inf); NaN matches NaN whatever its payload."""
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(bits(got)[~nan], bits(want)[~nan])


# ---------------------------------------------------------------------------------------------------- unpack

def test_unpack_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    blocks, scales = random_mx(lo=0, hi=255)          # every scale byte, 0 (2**-127) and 255 (2**128) included
    ours = unpack(blocks, scales)
    assert ours.shape == (3, 64, 4 * 32) and ours.dtype == torch.float32
    oracle = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=torch.float32)   # (E, in, out)
    assert oracle.shape == (3, 4 * 32, 64)
    assert_same_bits(ours.transpose(1, 2).contiguous(), oracle.contiguous())
    # bf16 output is exact too (every e2m1 value times a power of two is representable, or overflows in both)
    oracle16 = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=torch.bfloat16)
    assert_same_bits(unpack(blocks, scales, torch.bfloat16).transpose(1, 2).contiguous(), oracle16.contiguous())


def ldexp_reference(dtype: torch.dtype) -> torch.Tensor:
    """``(256, 16)``: code ``c`` under scale byte ``s`` as ``math.ldexp`` gives it in Python floats, rounded to
    ``dtype`` once (float64 holds every product exactly: at most 6 * 2**128)."""
    exact = [[math.ldexp(e2m1(c), s - 127) for c in range(16)] for s in range(256)]
    return torch.tensor(exact, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decoder", ["unpack", "decode", "Mxfp4Weight"])
def test_decoders_are_ldexp_for_every_scale_byte_and_code(decoder, dtype):
    # group s holds the 16 codes twice (bytes 0x10 * c + c) under scale byte s
    codes = torch.arange(16, dtype=torch.uint8)
    blocks = (codes * 0x11).repeat(256, 1)                                  # (256, 16): byte c is (c, c)
    scales = torch.arange(256, dtype=torch.uint8)                          # (256,)
    if decoder == "unpack":
        out = unpack(blocks, scales, dtype)
    elif decoder == "decode":
        out = mxfp4.decode(blocks, scales, dtype)
    else:   # the dense view a model sees: (E, in, out) of one expert with one output row
        out = Mxfp4Weight(blocks[None, None], scales[None, None], dtype).dequantize()[0, :, 0]
    out = out.reshape(256, 16, 2)
    want = ldexp_reference(dtype)
    assert_same_bits(out[..., 0].contiguous(), want)
    assert_same_bits(out[..., 1].contiguous(), want)
    # what the old exp2 decoder got wrong: byte 255 keeps zeros and 0.5 * 2**128 = 2**127; byte 0 is 2**-127
    assert out[255, 0, 0].item() == 0.0 and math.copysign(1.0, out[255, 8, 0].item()) == -1.0
    assert out[255, 1, 0].item() == 2.0 ** 127 and out[255, 2, 0].item() == math.inf
    assert out[0, 1, 0].item() == 2.0 ** -128 and out[0, 15, 0].item() == -6 * 2.0 ** -127


def test_unpack_every_byte_value():
    # 256 bytes = 16 groups of 16 bytes; each byte gives its low nibble first, then its high nibble
    blocks = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    scales = torch.full((16,), 127, dtype=torch.uint8)
    values = unpack(blocks, scales).flatten().tolist()
    expected = []
    for b in range(256):
        expected += [e2m1(b & 0x0F), e2m1(b >> 4)]
    assert values == expected
    # the sign of zero is kept: code 8 is -0.0
    assert math.copysign(1.0, values[2 * 0x08]) == -1.0


def test_unpack_known_bytes_and_scales():
    blocks = torch.zeros(3, 1, 16, dtype=torch.uint8)
    blocks[:, 0, 0] = 0x21      # low nibble 1 (0.5), high nibble 2 (1.0)
    blocks[:, 0, 1] = 0x9F      # low nibble F (-6.0), high nibble 9 (-0.5)
    blocks[:, 0, 15] = 0x7C     # low nibble C (-2.0), high nibble 7 (6.0)
    scales = torch.tensor([[127], [128], [126]], dtype=torch.uint8)
    out = unpack(blocks, scales)
    assert out.shape == (3, 32)
    for row, factor in zip(out, (1.0, 2.0, 0.5)):
        assert row[:4].tolist() == [0.5 * factor, 1.0 * factor, -6.0 * factor, -0.5 * factor]
        assert row[30:].tolist() == [-2.0 * factor, 6.0 * factor]
        assert row[4:30].abs().sum().item() == 0


def test_unpack_extreme_scales():
    blocks = torch.full((2, 16), 0x71, dtype=torch.uint8)     # two groups of 0.5, 6.0 repeated
    scales = torch.tensor([1, 200], dtype=torch.uint8)
    out = unpack(blocks, scales).reshape(2, 32)
    assert out[0, :2].tolist() == [math.ldexp(0.5, 1 - 127), math.ldexp(6.0, 1 - 127)]
    assert out[1, :2].tolist() == [math.ldexp(0.5, 200 - 127), math.ldexp(6.0, 200 - 127)]


def test_unpack_validation():
    blocks, scales = random_mx(e=1, rows=2, groups=2)
    with pytest.raises(TypeError):
        unpack(blocks.to(torch.int16), scales)
    with pytest.raises(TypeError):
        unpack(blocks, scales.to(torch.int32))
    with pytest.raises(ValueError):
        unpack(blocks[..., :8], scales)                 # 8 bytes per group instead of 16
    with pytest.raises(ValueError):
        unpack(blocks, scales[..., :1])                 # one scale for two groups
    with pytest.raises(ValueError):
        unpack(blocks, scales.unsqueeze(-1))


# ------------------------------------------------------------------------------- the reference encoder (OCP MX spec)
#
# OCP Microscaling Formats (MX) v1.0, section 6.3, converting a block of k values V_i to MX:
#   shared_exp = floor(log2(max_i |V_i|)) - emax_elem      (emax_elem = 2 for e2m1: its largest normal is 1.5 * 2**2)
#   X = 2 ** shared_exp                                      (E8M0: exponents -127..127, bias 127; byte 255 is NaN)
#   P_i = V_i / X quantized to the element format: round to nearest, ties to even; normal values beyond the largest
#         representable clamp to it (6 for e2m1)
# That is scale rounding "down". gpt-oss's and transformers' quantizers instead take X = the smallest power of two with
# max |V_i| / X <= 6 ("up"). Both here are written per group in plain Python floats (float64, which holds every float32
# and every quotient by a power of two below exactly), with no code from inference.model.mxfp4.

def ref_exponent(values: list[float], rounding: str) -> int:
    amax = max(abs(v) for v in values)
    if amax == 0:
        return 0       # an all-zero group decodes to zeros under any scale; the encoder writes byte 127
    if rounding == "down":   # the largest k in E8M0's range with 2**(k + 2) <= amax, i.e. floor(log2(amax)) - 2
        k = 127
        while k > -127 and 2.0 ** (k + 2) > amax:
            k -= 1
    else:                    # the smallest k in E8M0's range with amax <= 6 * 2**k
        k = -127
        while k < 127 and amax > 6.0 * 2.0 ** k:
            k += 1
    return k


def ref_code(v: float, exponent: int) -> int:
    y = abs(v) / 2.0 ** exponent
    # nearest e2m1 magnitude, a tie to the even code (mantissa bit 0); beyond 6 the nearest is 6 (saturation)
    code = min(range(8), key=lambda c: (abs(y - E2M1[c]), c % 2))
    return code | (8 if math.copysign(1.0, v) < 0 else 0)     # the sign bit, -0.0 and negatives rounding to 0 too


def ref_pack(x: torch.Tensor, rounding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, K)`` float32 -> MXFP4 ``blocks (N, K/32, 16)``, ``scales (N, K/32)``, one group at a time."""
    n, k = x.shape
    blocks, scales = [], []
    for group in x.reshape(-1, 32).tolist():
        exponent = ref_exponent(group, rounding)
        codes = [ref_code(v, exponent) for v in group]
        blocks.append([codes[2 * i] | codes[2 * i + 1] << 4 for i in range(16)])    # low nibble first
        scales.append(exponent + 127)
    return (torch.tensor(blocks, dtype=torch.uint8).reshape(n, k // 32, 16),
            torch.tensor(scales, dtype=torch.uint8).reshape(n, k // 32))


def f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def edge_case_groups(g: torch.Generator) -> torch.Tensor:
    """``(N, 32)`` float32 groups at the corners of the rules, each filled up with seeded noise below its amax."""
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]          # midpoints of the e2m1 grid (scale 1)
    ties2 = [2 * t for t in ties] + [7.0]                   # the same for scale 2, where "up" puts an amax in (6, 12]
    tiny, huge = 2.0 ** -149, float(torch.finfo(torch.float32).max)

    def group(fixed: list[float], amax: float) -> torch.Tensor:
        row = (torch.rand(32, generator=g) * 2 - 1) * amax * 0.99                # |noise| < amax
        row[:len(fixed)] = f32(fixed)
        return row[torch.randperm(32, generator=g)]

    rows = [torch.zeros(32), torch.full((32,), -0.0), f32([0.0, -0.0] * 15 + [1.0, -2.0 ** -30])]
    for k in (-130, -126, -20, -1, 0, 1, 3, 50, 120, 125):   # 6 * 2**k: the largest amax that "up" keeps at 2**k
        six = math.ldexp(6.0, k)
        if six > huge:
            continue
        above = torch.nextafter(f32(six), f32(math.inf)).item()
        below8 = torch.nextafter(f32(math.ldexp(8.0, k)), f32(0.0)).item()
        rows += [group([six, -six], six), group([above], above), group([math.ldexp(4.0, k)], math.ldexp(4.0, k)),
                 group([below8], below8), group([math.ldexp(t, k) for t in ties] + [six], six)]
        if math.ldexp(max(ties2), k) <= huge:
            rows.append(group([-math.ldexp(t, k) for t in ties2], math.ldexp(7.0, k)))
    rows += [f32([2.0 ** i for i in range(-10, 22)]), f32([-(2.0 ** i) for i in range(-149, -117)]),
             group([huge, -huge], huge), group([3e38, tiny, -tiny], 3e38), f32([tiny] * 16 + [-tiny] * 16),
             group([2.0 ** -126, 2.0 ** -127], 2.0 ** -126), group([1e-40, -3e-41], 1e-40),
             group([5.0, 4.99, 5.01, 0.2500001, 0.7499999, -1.75, -2.5], 5.01)]
    return torch.stack(rows)


def random_groups(g: torch.Generator, rows: int, k: int) -> torch.Tensor:
    """Normal values whose groups' magnitudes span 2**-30..2**30, and grid midpoints times random powers of two."""
    x = torch.randn(rows, k // 32, 32, generator=g) * 2.0 ** torch.randint(-30, 31, (rows, k // 32, 1), generator=g)
    midpoints = f32([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0])[torch.randint(0, 8, (rows, k), generator=g)]
    signs = torch.randint(0, 2, (rows, k), generator=g) * 2 - 1
    ties = (signs * midpoints).reshape(rows, k // 32, 32) * 2.0 ** torch.randint(-8, 9, (rows, k // 32, 1), generator=g)
    return torch.cat((x.reshape(rows, k), ties.reshape(rows, k)))


@pytest.mark.parametrize("rounding", ["down", "up"])
def test_pack_equals_the_spec_reference_byte_for_byte(rounding):
    g = torch.Generator().manual_seed(11)
    edges = edge_case_groups(g)
    x = torch.cat((edges, random_groups(g, 24, 128).reshape(-1, 32)))                      # (N, 32)
    blocks, scales = pack(x, rounding)
    ref_blocks, ref_scales = ref_pack(x, rounding)
    assert torch.equal(scales, ref_scales)
    assert torch.equal(blocks, ref_blocks)
    # what the two conventions mean: "down" saturates above 6 and keeps amax / scale in [4, 8); "up" never saturates
    # and keeps it in (3, 6] (except where E8M0's range clamps the scale, or for an all-zero group)
    amax = x.reshape(-1, 32).abs().amax(-1).double()
    ratio = amax / torch.pow(2.0, scales.reshape(-1).double() - 127)
    inside = (amax > 2.0 ** -124)
    low, high = (4, 8) if rounding == "down" else (3, 6)
    assert bool(((ratio[inside] >= low) & (ratio[inside] < high) if rounding == "down"
                 else (ratio[inside] > low) & (ratio[inside] <= high)).all())


def test_up_scale_is_the_down_scale_or_twice_it():
    g = torch.Generator().manual_seed(12)
    x = torch.cat((edge_case_groups(g), random_groups(g, 16, 64).reshape(-1, 32)))
    _, down = pack(x, "down")
    _, up = pack(x, "up")
    diff = (up.int() - down.int()).reshape(-1)                                              # (N,)
    assert bool(((diff == 0) | (diff == 1)).all())
    # they differ exactly where amax / 2**down is above 6 (float64 holds that quotient exactly)
    amax = x.abs().amax(-1).double()
    assert torch.equal(diff == 1, amax / torch.pow(2.0, down.reshape(-1).double() - 127) > 6)
    assert 0 < int(diff.sum()) < len(diff)


def test_pack_shared_scale():
    for amax, exponent in [(1.0, -2), (1.5, -2), (1.999, -2), (2.0, -1), (4.0, 0), (7.99, 0), (8.0, 1),
                           (6.0, 0), (0.3, -4), (1000.0, 7), (2.0 ** -20, -22)]:
        x = torch.zeros(32)
        x[5] = amax
        x[6] = -amax / 3
        _, scales = pack(x)
        assert scales.tolist() == [127 + exponent], (amax, scales)
        # the amax is never above 8 * scale after the shift, so the largest element is at least 4 (never rounds to 0)
        assert unpack(*pack(x))[5].item() >= 4 * 2.0 ** exponent
        # "up": the smallest power of two with amax / scale <= 6, i.e. twice the down scale when amax / scale > 6
        _, up = pack(x, "up")
        assert up.tolist() == [127 + exponent + (amax / 2.0 ** exponent > 6)], (amax, up)


def test_pack_round_to_nearest_even_and_saturation():
    inputs = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.9, 0.24, 0.26, 2.49, 2.51, 6.0, 4.0, 0.0, 1.0,
              5.5, 0.5, 3.0, 1.5, 0.74, 0.76, 3.49, 3.51, 4.99, 5.01, 1.24, 1.26, 1.74, 1.76, 7.0, 6.5]
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 0.0, 0.5, 2.0, 3.0, 6.0, 4.0, 0.0, 1.0,
                6.0, 0.5, 3.0, 1.5, 0.5, 1.0, 3.0, 4.0, 4.0, 6.0, 1.0, 1.5, 1.5, 2.0, 6.0, 6.0]
    x = torch.tensor(inputs)            # amax 7.9 in [4, 8): shared scale 2**0
    blocks, scales = pack(x)
    assert scales.tolist() == [127]
    assert unpack(blocks, scales).tolist() == expected
    # negative values are symmetric (sign bit set, same magnitude code)
    nblocks, nscales = pack(-x)
    assert nscales.tolist() == [127]
    assert unpack(nblocks, nscales).tolist() == [-v for v in expected]
    assert torch.equal(nblocks & 0x77, blocks & 0x77)
    nonzero = torch.tensor(expected) != 0
    codes = torch.stack((nblocks & 0x0F, nblocks >> 4), -1).flatten()
    assert bool(((codes[nonzero] & 8) == 8).all())
    # the same with a scale of 2**3: ties keep rounding to even on the scaled value
    blocks8, scales8 = pack(x * 8)
    assert scales8.tolist() == [130]
    assert unpack(blocks8, scales8).tolist() == [v * 8 for v in expected]
    # "up" takes scale 2 (7.9 / 2 <= 6): nothing saturates, ties at odd multiples of 0.25 * 2 still go to even codes
    ublocks, uscales = pack(x, "up")
    assert uscales.tolist() == [128]
    assert unpack(ublocks, uscales).tolist() == [2 * E2M1[ref_code(v, 1)] for v in x.tolist()]


def test_pack_all_zero_group_and_mixed_groups():
    x = torch.zeros(2, 64)
    x[1, 32:] = torch.linspace(-3, 3, 32)
    for rounding in mxfp4.SCALE_ROUNDINGS:
        blocks, scales = pack(x, rounding)
        assert blocks.shape == (2, 2, 16) and scales.shape == (2, 2)
        assert blocks.dtype == torch.uint8 and scales.dtype == torch.uint8
        out = unpack(blocks, scales)
        assert out[0].abs().sum().item() == 0 and out[1, :32].abs().sum().item() == 0
        assert scales[0].tolist() == [127, 127] and int(blocks[0].sum()) == 0
        assert torch.isfinite(out).all()
    for rounding in ("down", "up"):
        assert all(torch.equal(ours, ref) for ours, ref in zip(pack(x, rounding), ref_pack(x, rounding)))


def test_pack_unpack_exact_on_grid():
    # values already on the MXFP4 grid (decoded from random bytes, scales 0..252 where every value is finite:
    # 6 * 2**126 overflows float32) come back exactly under every rounding: both candidate scales hold them
    blocks, scales = random_mx(e=2, rows=8, groups=3, lo=0, hi=252, seed=1)
    values = unpack(blocks, scales)
    for rounding in mxfp4.SCALE_ROUNDINGS:
        b2, s2, stats = pack_with_stats(values, rounding)
        assert_same_bits(unpack(b2, s2), values)
        assert stats.sq_error == stats.sq_error_down == stats.sq_error_up == 0
    # when every group holds a magnitude-6 code its amax fixes the scale under both conventions (the canonical
    # encoding), and the bytes are the same, signed zeros (code 8) included
    blocks[..., 0] = (blocks[..., 0] & 0xF0) | 0x07          # 6.0 as the first value of each group
    values = unpack(blocks, scales)
    for rounding in mxfp4.SCALE_ROUNDINGS:
        b2, s2 = pack(values, rounding)
        assert torch.equal(s2, scales) and torch.equal(b2, blocks)


def test_pack_random_normal_error_bound():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 64, generator=g) * torch.logspace(-3, 2, 5).reshape(1, 5, 1)
    blocks, scales = pack(x)
    assert blocks.shape == (4, 5, 2, 16) and scales.shape == (4, 5, 2)
    assert torch.equal(blocks.reshape(20, 2, 16), ref_pack(x.reshape(20, 64), "down")[0])
    y = unpack(blocks, scales)
    # Bound, per element: with S = 2**(floor(log2 amax) - 2), |x|/S < 8. The e2m1 grid has step 0.5 on [0, 2],
    # 1 on [2, 4], 2 on [4, 6], so nearest rounding errs by at most half a step: 0.25, 0.5, 1 (times S); above 6
    # the value saturates to 6 and errs by |x|/S - 6 < 2. Both sides are exact (powers of two times float32 values).
    s = torch.pow(2.0, scales.double() - 127).repeat_interleave(32, -1)
    m = x.double().abs() / s
    bound = torch.where(m <= 2, 0.25, torch.where(m <= 4, 0.5, torch.where(m <= 6, 1.0, m - 6)))
    assert bool(((y.double() - x.double()).abs() <= bound * s).all()) and bool((m < 8).all())
    # hence per group the largest error is below a quarter of the group's amax (worst cases: 5/4 -> 4, 7.99 -> 6)
    rel = (y - x).abs().reshape(-1, 32).amax(-1) / x.abs().reshape(-1, 32).amax(-1)
    assert rel.max().item() <= 0.25


def test_pack_leading_dims_chunks_and_validation(monkeypatch):
    x = torch.randn(3, 2, 96, generator=torch.Generator().manual_seed(4))
    blocks, scales = pack(x)
    assert blocks.shape == (3, 2, 3, 16) and scales.shape == (3, 2, 3)
    assert unpack(blocks, scales).shape == x.shape
    # chunking over groups (bounded memory) changes nothing: bytes and counts equal, error sums up to float64
    # summation order (each per-group sum within 31 units of 2**-53 of exact, the sum of 18 within 17 more)
    whole = {r: pack_with_stats(x, r) for r in mxfp4.SCALE_ROUNDINGS}
    monkeypatch.setattr(mxfp4, "PACK_CHUNK_GROUPS", 5)
    for rounding, (b, s, stats) in whole.items():
        b5, s5, stats5 = pack_with_stats(x, rounding)
        assert torch.equal(b, b5) and torch.equal(s, s5)
        assert stats.groups == 18 and (stats.differ, stats.took_up) == (stats5.differ, stats5.took_up)
        assert math.isclose(stats.sq_error, stats5.sq_error, rel_tol=2 * (18 + 32) * U)
    with pytest.raises(ValueError):
        pack(torch.randn(4, 48))
    with pytest.raises(ValueError):
        pack(torch.randn(31))
    with pytest.raises(ValueError, match="scale_rounding"):
        pack(x, "nearest")
    for bad in (math.inf, -math.inf, math.nan):
        y = x.clone()
        y[1, 1, 40] = bad
        with pytest.raises(ValueError, match="inf or NaN"):
            pack(y, "best")
    # bf16 input, and a tensor that requires grad, are fine
    xb = torch.randn(2, 32, dtype=torch.bfloat16)
    assert torch.equal(unpack(*pack(xb)), unpack(*pack(xb.float())))
    pack(torch.randn(1, 32, requires_grad=True))


# ---------------------------------------------------------------------------------------------------- "best"

def varying_magnitudes(g: torch.Generator) -> torch.Tensor:
    """Normal values, each group of 32 scaled by its own 2**u, u uniform in [-4, 4]: amax / scale lands anywhere."""
    x = torch.randn(64, 8, 32, generator=g) * torch.exp2(torch.rand(64, 8, 1, generator=g) * 8 - 4)
    return x.reshape(64, 256)


def heavy_tailed(g: torch.Generator, dof: int = 3) -> torch.Tensor:
    """Student-t with ``dof`` degrees of freedom: Z / sqrt(chi2_dof / dof), all from the seeded generator."""
    z = torch.randn(64, 256, generator=g, dtype=torch.float64)
    chi2 = torch.randn(dof, 64, 256, generator=g, dtype=torch.float64).square().sum(0)
    return (z / (chi2 / dof).sqrt()).float()


def group_sq_errors(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> list[float]:
    """Per group ``sum((Q(x) - x) ** 2)`` in float64, computed here from the decoded bytes. ``Q(x) - x`` is exact in
    float64 (both float32, within a few binades of each other) and so is its square (48 significant bits): the sum's
    roundings are the only error, at most 31 units of 2**-53 relative for 32 non-negative terms."""
    d = unpack(blocks, scales).double().reshape(-1, 32) - x.double().reshape(-1, 32)
    return d.square().sum(-1).tolist()


def test_best_picks_the_lower_error_and_ties_go_down():
    x = torch.zeros(3, 32)
    x[0, 0] = 7.0                 # down: saturates to 6 (error 1); up: 7 / 2 = 3.5, a tie, to 4 -> 8 (error 1)
    x[1, 0] = 7.9                 # down: 6 (error 1.9); up: 3.95 -> 4 -> 8 (error 0.1)
    x[2, :2] = f32([6.1, 0.5])    # down: 6 and 0.5 (errors 0.1, 0); up: 3.05 -> 3 -> 6 and 0.25, a tie, to 0 (0.1, 0.5)
    _, down = pack(x, "down")
    _, up = pack(x, "up")
    blocks, best = pack(x, "best")
    assert down.tolist() == [[127]] * 3 and up.tolist() == [[128]] * 3
    assert best.tolist() == [[127], [128], [127]]
    assert unpack(blocks, best)[:, :2].tolist() == [[6.0, 0.0], [8.0, 0.0], [6.0, 0.5]]


@pytest.mark.parametrize("data", [varying_magnitudes, heavy_tailed])
def test_best_is_never_worse_than_either_convention(data):
    x = data(torch.Generator().manual_seed(21))
    errors, packed, stats = {}, {}, {}
    for rounding in mxfp4.SCALE_ROUNDINGS:
        blocks, scales, stats[rounding] = pack_with_stats(x, rounding)
        packed[rounding] = blocks.reshape(-1, 16), scales.reshape(-1)
        errors[rounding] = group_sq_errors(x, blocks, scales)
    n = len(errors["best"])
    # The encoder picks by its own float64 sums and we compare ours; each is within 31 units (2**-53) of the exact sum
    # of the same 32 exact terms, so a pick can look wrong here by at most 4 * 31 < 128 units relative, and only
    # between near-equal errors.
    tol = 128 * U
    for i, (best, down, up) in enumerate(zip(errors["best"], errors["down"], errors["up"])):
        assert best <= min(down, up) * (1 + tol), i
        # and "best" is one of the two encodings of the group: the one with the lower error (a near-tie either)
        if up < down * (1 - tol):
            took = "up"
        elif down < up * (1 - tol) or packed["up"][1][i] == packed["down"][1][i]:
            took = "down"
        else:
            continue
        assert torch.equal(packed["best"][0][i], packed[took][0][i]) and packed["best"][1][i] == packed[took][1][i]
    total = {r: math.fsum(e) for r, e in errors.items()}      # exact sums, rounded once (one more unit each)
    assert total["best"] <= min(total["down"], total["up"]) * (1 + tol + 2 * U)
    # the encoder's own report says the same without tolerance (its three sums run over the same groups in the same
    # order and rounded addition is monotone), and agrees with ours to the sums' rounding: n + 31 units relative each
    s = stats["best"]
    assert s.sq_error <= min(s.sq_error_down, s.sq_error_up) and s.rel_error() <= min(s.rel_error("down"),
                                                                                      s.rel_error("up"))
    for rounding, key in (("best", "sq_error"), ("down", "sq_error_down"), ("up", "sq_error_up")):
        assert math.isclose(getattr(s, key), total[rounding], rel_tol=2 * (n + 32) * U), rounding
        assert math.isclose(stats[rounding].sq_error, total[rounding], rel_tol=2 * (n + 32) * U), rounding
    assert math.isclose(s.sq_norm, math.fsum(x.double().square().flatten().tolist()), rel_tol=2 * x.numel() * U)
    # the counts: groups whose scales differ, and how many of those "best" encodes with the up scale
    differ, took_up = packed["up"][1] != packed["down"][1], packed["best"][1] != packed["down"][1]
    assert (s.groups, s.differ, s.took_up) == (n, int(differ.sum()), int(took_up.sum()))
    assert stats["down"].took_up == 0 and stats["up"].took_up == stats["up"].differ == s.differ
    # neither convention wins everywhere on these data, so "best" mixes them and beats both strictly
    assert 0 < s.took_up < s.differ
    assert total["best"] < min(total["down"], total["up"])
