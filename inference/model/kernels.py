"""GPU kernels for the runtime (Triton, CUDA only), each with its plain-PyTorch twin as the reference.

:func:`mxfp4_matvec` multiplies a few activation rows by MXFP4-packed expert weights without ever writing the
decoded weights to memory: each program reads packed bytes and their scales, decodes them in registers and
accumulates in fp32. That is the decoding step's expert work (a few tokens, each routed to k experts), where the
plain path (:func:`mxfp4_matvec_reference`: decode the routed experts to ``dtype``, then ``bmm``) moves about eight
times the bytes. Prefill (many tokens per expert) stays on the plain path, whose matmuls are compute-bound anyway.

:func:`mxfp4_decode` decodes packed expert weights to bf16/fp32 in one pass (each packed byte read once, its two
values written once): the training path's expert matmuls decode a slice of all experts before each grouped matmul,
forward and backward, so this runs at memory speed on every step. Its twin is :func:`inference.model.mxfp4.unpack`.

:func:`mxfp4_grouped` is the batched decode step's expert work: up to :data:`GROUPED_MAX_TOKENS` tokens, each routed
to k experts. One program per (expert, block of outputs) decodes that block of the expert's weights in registers
once and multiplies it with every row routed to the expert (a tensor-core ``dot``), so each routed expert is read
once per step however many sequences chose it, and an expert no row chose is not read at all. The rows of each
expert are found on the device (no host synchronisation), so the step can be captured as a CUDA graph. Its twin is
:func:`mxfp4_matvec_reference`.

:func:`mxfp4_matvec` takes ``fast``: when every scale byte of the weight is at most :data:`FAST_MAX_SCALE`
(:func:`scales_fit_bf16`, checked once per weight; every real checkpoint's are), four packed bytes become eight bf16
weights in a few 32-bit integer operations and two packed bf16 multiplies (``_fp4_pairs``), exactly, instead of
being decoded through fp32.
"""

from __future__ import annotations

import functools

import torch

from inference.model import mxfp4


def mxfp4_matvec_reference(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                           experts: torch.Tensor) -> torch.Tensor:
    """``y[i] = W[experts[i]] @ x[i]`` with ``W`` decoded from ``blocks (E, N, K/32, 16)``/``scales (E, N, K/32)``.

    ``x (n, K)``, ``experts (n,)`` → ``(n, N)`` in ``x.dtype``.
    """
    w = mxfp4.unpack(blocks[experts], scales[experts], x.dtype)          # (n, N, K)
    return torch.bmm(w, x[:, :, None])[:, :, 0]


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Triton and a CUDA device are both there (the CPU build of torch has no Triton)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def mxfp4_matvec(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, experts: torch.Tensor,
                 fast: bool = False) -> torch.Tensor:
    """:func:`mxfp4_matvec_reference`, fused: the result is in ``x.dtype``, accumulated in fp32. ``fast``: the
    weight's scales fit :data:`FAST_MAX_SCALE` (:func:`scales_fit_bf16`)."""
    n, K = x.shape
    E, N, G, half_group = blocks.shape
    if K != G * 32 or half_group != 16:
        raise ValueError(f"x has {K} features, blocks hold {G * 32}")
    out = torch.empty(n, N, dtype=torch.float32, device=x.device)
    block_n, block_k, warps = _MATVEC
    grid = (n, -(-N // block_n))
    _kernel()[grid](x.contiguous(), blocks, scales, experts.contiguous(), out, N, K,
                    blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1),
                    BLOCK_N=block_n, BLOCK_K=block_k, FAST=fast, num_warps=warps)
    return out.to(x.dtype)


# (output rows, input features, warps) per program and step (K need not be a multiple: masked): 16 x 256 with 4 warps
# was the fastest of the tiles tried at gpt-oss-20b shapes on an H100 (74/45 us for the two projections of one
# token, 89/51 with 32 x 256). The fast decode uses the same tile (no other tried): 69.2/40.8 us against 74.0/45.9
# with the general decode, one H200, the same run (benchmarks/results/mxfp4_kernels-20b-h200-2026-12-07-fast-
# decode.json).
_MATVEC = (16, 256, 4)

FAST_MAX_SCALE = 128   # E8M0 bytes up to this: 2^(s - 1), the factor _fp4_pairs multiplies by, is a normal bf16


def scales_fit_bf16(scales: torch.Tensor) -> bool:
    """Whether every E8M0 byte of ``scales`` is at most :data:`FAST_MAX_SCALE`, so :func:`mxfp4_matvec`'s ``fast``
    decode is exact (a decoded weight of at most 6 * 2^(128 - 127) = 12; real checkpoints' are far smaller). One
    read back to the host: call it once per weight, never inside a captured step."""
    return int(scales.max()) <= FAST_MAX_SCALE


GROUPED_MAX_TOKENS = 4096   # a prefill chunk's tokens at most (the table of rows per expert is E x tokens)


def expert_rows(experts: torch.Tensor, num_experts: int, max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(table (E, max_rows) int32, counts (E,) int32)``: the row numbers routed to each expert, in row order, from
    ``experts (P,)`` on the device, without reading anything back to the host. Entries past an expert's count are
    undefined (the grouped kernel never reads them).

    One Triton program per expert scans the routing once (a decode step's layer builds this once for both of its
    projections); the PyTorch twin (:func:`expert_rows_reference`) takes a dozen kernels."""
    if not (experts.is_cuda and available()):
        return expert_rows_reference(experts, num_experts, max_rows)
    P = experts.numel()
    table = torch.empty(num_experts, max_rows, dtype=torch.int32, device=experts.device)
    counts = torch.empty(num_experts, dtype=torch.int32, device=experts.device)
    _rows_kernel()[(num_experts,)](experts.contiguous(), table, counts, P, max_rows, BLOCK_P=1024, num_warps=4)
    return table, counts


def expert_rows_reference(experts: torch.Tensor, num_experts: int, max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`expert_rows` in PyTorch (entries past a count are -1)."""
    P = experts.numel()
    order = torch.argsort(experts, stable=True)                                        # rows in expert order
    counts = torch.zeros(num_experts, dtype=torch.int32, device=experts.device)
    counts.scatter_add_(0, experts, torch.ones_like(experts, dtype=torch.int32))
    starts = torch.cumsum(counts, 0, dtype=torch.int32) - counts                       # (E,)
    sorted_experts = experts[order]
    rank = torch.arange(P, device=experts.device, dtype=torch.int32) - starts[sorted_experts]   # place in its group
    table = torch.full((num_experts, max_rows), -1, dtype=torch.int32, device=experts.device)
    table[sorted_experts, rank.long()] = order.to(torch.int32)
    return table, counts


@functools.lru_cache(maxsize=1)
def _rows_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(experts_ptr, table_ptr, counts_ptr, P, max_rows, BLOCK_P: tl.constexpr):
        e = tl.program_id(0)
        count = tl.zeros((), dtype=tl.int32)
        for p0 in range(0, P, BLOCK_P):
            offs = p0 + tl.arange(0, BLOCK_P)
            hit = (tl.load(experts_ptr + offs, mask=offs < P, other=-1) == e).to(tl.int32)     # (BLOCK_P,)
            rank = count + tl.cumsum(hit, axis=0) - 1                                            # place among e's
            tl.store(table_ptr + e.to(tl.int64) * max_rows + rank, offs.to(tl.int32), mask=hit == 1)
            count += tl.sum(hit, axis=0)
        tl.store(counts_ptr + e, count)

    return kernel


def grouped_tile(tokens: int) -> tuple:
    """:func:`mxfp4_grouped`'s tile for a step of ``tokens`` tokens: ``(BLOCK_M, PER_GROUP, BLOCK_N, BLOCK_K, warps,
    stages, SWAP, DEINT)`` (the last two: see ``rows_block``)."""
    block_m = min(64, max(16, 1 << (tokens - 1).bit_length()))
    # Up to 16 rows per expert block: decoding the weights is the cost, so each 32-value group is multiplied
    # unscaled and its scale applied once to the (M, N) partial (per_group). More rows: one dot per K tile with the
    # scales applied per weight, so each decoded tile serves up to 64 rows. Measured at gpt-oss-20b shapes on an
    # H100 (benchmarks/results/serve_load-20b-h100-2026-12-06.json and the README): per_group for up to 64 tokens
    # won the kernel benchmark with routing spread evenly (416 vs 620 us for gate_up at 64 tokens) but lost end to
    # end (64 sequences: 1,625 vs 3,170 tokens/s in benchmarks/decode_speed.py), most likely because real routing
    # gives some experts many rows and per_group decodes the weights again for every 16 of them (not profiled).
    # Triton's tl.dot_scaled (the compiler decodes MXFP4 in registers on Hopper) was measured against this kernel and
    # mxfp4_matvec at gpt-oss-20b shapes on an H100 (benchmarks/results/mxfp4_kernels-20b-h100-2026-12-07.json, from
    # commit 0de6428): right only with the weights as its left operand, and then 1.3-1.7x slower from 16 tokens up
    # and no faster than mxfp4_matvec at one token (74.8 vs 74.8 us for gate_up, 41.3 vs 45.4 for down). Not used.
    # mxfp4_matvec's fast decode (_fp4_pairs: bf16 straight from the packed bits, each byte's scale gathered with it,
    # even and odd values as two dots against x's even and odd columns) was tried here too, at commit 8181e93: exact,
    # but 460/248 us against 285/198 at 16 tokens and 1,326/690 against 558/288 at 64 on an H200
    # (benchmarks/results/mxfp4_kernels-20b-h200-2026-12-07-fast-decode.json). A scratch twin of it that decoded with
    # plain Triton integer ops was as slow (1,322/688 us at 64 tokens, H100), so the cost lies in that structure
    # (probably the per-byte scale gather or the half-width dots; not profiled), not in decoding fp4. Not used.
    per_group = block_m == 16
    block_n, block_k, warps = (128, 32, 4) if per_group else (64, 64, 8)
    return block_m, per_group, block_n, block_k, warps, 3, False, False


def mxfp4_grouped(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, experts: torch.Tensor,
                  tokens: int, rows: tuple[torch.Tensor, torch.Tensor] | None = None,
                  tile: tuple | None = None) -> torch.Tensor:
    """:func:`mxfp4_matvec_reference` for ``x (P, K)`` rows of at most ``tokens`` tokens (P = tokens * k, a token
    routed to each expert at most once, so an expert has at most ``tokens`` rows): bf16/fp16 ``x``, fp32
    accumulation, result in ``x.dtype``. An expert's rows are taken ``BLOCK_M`` at a time. ``rows``:
    :func:`expert_rows` of ``experts`` when the caller already has it (both projections of a layer share it).
    ``tile``: ``(BLOCK_M, PER_GROUP, BLOCK_N, BLOCK_K, warps, stages, SWAP, DEINT)`` instead of
    :func:`grouped_tile`'s choice (``benchmarks/mxfp4_kernels.py --sweep`` measures them)."""
    P, K = x.shape
    E, N, G, half_group = blocks.shape
    if K != G * 32 or half_group != 16:
        raise ValueError(f"x has {K} features, blocks hold {G * 32}")
    if tokens > GROUPED_MAX_TOKENS:
        raise ValueError(f"mxfp4_grouped takes at most {GROUPED_MAX_TOKENS} tokens, got {tokens}")
    block_m, per_group, block_n, block_k, warps, stages, swap, deint = tile or grouped_tile(tokens)
    table, counts = rows if rows is not None else expert_rows(experts, E, tokens)
    out = torch.empty(P, N, dtype=x.dtype, device=x.device)
    grid = (E, -(-N // block_n))
    _grouped_kernel()[grid](x.contiguous(), blocks, scales, table, counts, out, N, K, tokens,
                            blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1),
                            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PER_GROUP=per_group, SWAP=swap,
                            DEINT=deint, num_warps=warps, num_stages=stages)
    return out


@functools.lru_cache(maxsize=1)
def _grouped_kernel():
    import triton
    import triton.language as tl

    _grouped_rows = _grouped_rows_fn()

    @triton.jit
    def kernel(x_ptr, blocks_ptr, scales_ptr, table_ptr, counts_ptr, y_ptr, N, K, max_rows, stride_be, stride_bn,
               stride_se, stride_sn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               PER_GROUP: tl.constexpr, SWAP: tl.constexpr, DEINT: tl.constexpr):
        e = tl.program_id(0)
        count = tl.load(counts_ptr + e)
        if count == 0:          # no row chose this expert: its weights are not read
            return
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        e64 = e.to(tl.int64)
        w_rows = blocks_ptr + e64 * stride_be + offs_n[:, None].to(tl.int64) * stride_bn
        s_rows = scales_ptr + e64 * stride_se + offs_n[:, None].to(tl.int64) * stride_sn
        for m0 in range(0, count, BLOCK_M):   # the expert's rows, BLOCK_M at a time (the weight tile stays in L2)
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < count
            rows = tl.load(table_ptr + e64 * max_rows + offs_m, mask=mask_m, other=0).to(tl.int64)   # (M,)
            _grouped_rows(x_ptr, y_ptr, rows, mask_m, w_rows, s_rows, offs_n, mask_n, N, K,
                          BLOCK_M, BLOCK_N, BLOCK_K, PER_GROUP, SWAP, DEINT)

    return kernel


@functools.lru_cache(maxsize=1)
def _grouped_rows_fn():
    import triton
    import triton.language as tl

    pow2_pair, (e4m3_low, e4m3_high) = _pow2_pair(), _e4m3()

    @triton.jit
    def rows_block(x_ptr, y_ptr, rows, mask_m, w_rows, s_rows, offs_n, mask_n, N, K, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PER_GROUP: tl.constexpr, SWAP: tl.constexpr,
                   DEINT: tl.constexpr):
        """``y[rows, offs_n] = x[rows] @ W[offs_n]^T`` for one block of an expert's rows.

        ``SWAP``: the weights are the dot's left operand (``W x^T``, accumulated as ``(N, M)``): the decoded tile is
        the operand the tensor cores can take from registers on Hopper, and the few rows are the dot's narrow side.
        ``DEINT``: even and odd values (low and high nibbles) go to two half-width dots against x's even and odd
        columns instead of being interleaved into one tile.

        Scales multiply as ``(v * (lo * 64)) * hi`` (``pow2_pair``), so byte 255 overflows only where the product
        does and a zero weight stays zero, as in ``unpack``."""
        if SWAP:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if PER_GROUP:
            # one 32-value group (16 bytes) per step: two K=16 dots (even and odd values) with the exact unscaled
            # weights, then the group's scale on the partial. K is whole groups (checked by the caller).
            j = tl.arange(0, 16)
            for g in range(0, K // 32):
                packed = tl.load(w_rows + g * 16 + j[None, :], mask=mask_n[:, None], other=0)         # (N, 16)
                exponent = tl.load(s_rows + g, mask=mask_n[:, None], other=127)                         # (N, 1)
                lo, hi = pow2_pair(exponent)
                x_even = tl.load(x_ptr + rows[:, None] * K + (g * 32 + 2 * j)[None, :], mask=mask_m[:, None],
                                 other=0.0)                                                              # (M, 16)
                x_odd = tl.load(x_ptr + rows[:, None] * K + (g * 32 + 2 * j + 1)[None, :], mask=mask_m[:, None],
                                other=0.0)
                if SWAP:
                    part = tl.dot(e4m3_low(packed).to(x_even.dtype), tl.trans(x_even))
                    part = tl.dot(e4m3_high(packed).to(x_odd.dtype), tl.trans(x_odd), part)            # (N, M)
                    acc += part * (lo * 64.0) * hi
                else:
                    part = tl.dot(x_even, tl.trans(e4m3_low(packed).to(x_even.dtype)))
                    part = tl.dot(x_odd, tl.trans(e4m3_high(packed).to(x_odd.dtype)), part)            # (M, N)
                    acc += part * tl.reshape(lo * 64.0, (1, BLOCK_N)) * tl.reshape(hi, (1, BLOCK_N))
        else:
            offs_j = tl.arange(0, BLOCK_K // 2)              # byte j holds values 2j (low nibble) and 2j + 1
            offs_g = tl.arange(0, BLOCK_K // 32)
            offs_k = tl.arange(0, BLOCK_K)
            for k0 in range(0, K, BLOCK_K):
                mask_j = k0 + 2 * offs_j < K
                packed = tl.load(w_rows + (k0 // 2 + offs_j)[None, :], mask=mask_n[:, None] & mask_j[None, :],
                                 other=0)                                                               # (N, K/2)
                exponent = tl.load(s_rows + (k0 // 32 + offs_g)[None, :],
                                   mask=mask_n[:, None] & (k0 + 32 * offs_g < K)[None, :], other=127)  # (N, K/32)
                lo, hi = pow2_pair(exponent)
                lo, hi = (lo * 64.0)[:, :, None], hi[:, :, None]
                low = tl.reshape(tl.reshape(e4m3_low(packed).to(tl.float32), (BLOCK_N, BLOCK_K // 32, 16)) * lo * hi,
                                 (BLOCK_N, BLOCK_K // 2))                                               # (N, K/2)
                high = tl.reshape(tl.reshape(e4m3_high(packed).to(tl.float32), (BLOCK_N, BLOCK_K // 32, 16)) * lo
                                  * hi, (BLOCK_N, BLOCK_K // 2))
                if DEINT:
                    x_even = tl.load(x_ptr + rows[:, None] * K + (k0 + 2 * offs_j)[None, :],
                                     mask=mask_m[:, None] & mask_j[None, :], other=0.0)                # (M, K/2)
                    x_odd = tl.load(x_ptr + rows[:, None] * K + (k0 + 2 * offs_j + 1)[None, :],
                                    mask=mask_m[:, None] & mask_j[None, :], other=0.0)
                    if SWAP:
                        acc = tl.dot(low.to(x_even.dtype), tl.trans(x_even), acc)
                        acc = tl.dot(high.to(x_odd.dtype), tl.trans(x_odd), acc)
                    else:
                        acc = tl.dot(x_even, tl.trans(low.to(x_even.dtype)), acc)
                        acc = tl.dot(x_odd, tl.trans(high.to(x_odd.dtype)), acc)
                else:
                    w = tl.interleave(low, high)                                                       # (N, K)
                    xs = tl.load(x_ptr + rows[:, None] * K + (k0 + offs_k)[None, :],
                                 mask=mask_m[:, None] & (k0 + offs_k < K)[None, :], other=0.0)      # (M, K)
                    if SWAP:
                        acc = tl.dot(w.to(xs.dtype), tl.trans(xs), acc)
                    else:
                        acc = tl.dot(xs, tl.trans(w.to(xs.dtype)), acc)
        if SWAP:
            out = y_ptr + rows[None, :] * N + offs_n[:, None]
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])
        else:
            out = y_ptr + rows[:, None] * N + offs_n[None, :]
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    return rows_block


@functools.lru_cache(maxsize=1)
def _e4m3():
    import triton
    import triton.language as tl

    # An e2m1 nibble's bits placed into an e4m3 byte (sign to bit 7, exponent and mantissa to bits 4..2) make the
    # e4m3 number fp4 * 2^-6 exactly (e2m1's subnormal 0.5 lands on e4m3's subnormals); the hardware converts e4m3
    # to bf16 far faster than fp4 can be decoded with integer ops. The 2^6 goes back into the group's scale.
    @triton.jit
    def e4m3_low(packed):    # values 2j: the low nibbles of (N, J) bytes
        return (((packed & 8) << 4) | ((packed & 7) << 2)).to(tl.float8e4nv, bitcast=True)

    @triton.jit
    def e4m3_high(packed):   # values 2j + 1: the high nibbles
        return ((packed & 0x80) | ((packed & 0x70) >> 2)).to(tl.float8e4nv, bitcast=True)

    return e4m3_low, e4m3_high


@functools.lru_cache(maxsize=1)
def _fp4_pairs():
    import triton
    import triton.language as tl

    # $4: four packed bytes; $5, $6: their factors as two bf16x2 words; out: $0, $1 the low nibbles of bytes (0, 1)
    # and (2, 3), $2, $3 their high nibbles, each word two bf16 lanes. Per pair of bytes: prmt puts them in the low
    # bytes of the two 16-bit lanes, then for each nibble the sign (bit 3 or 7) is shifted to bit 15 and the e2m1
    # bits (0..2 or 4..6) to bits 6..8 of its lane, masked, joined and multiplied by the factors.
    pair = """
        prmt.b32 t, $4, 0, {select};
        shl.b32 u, t, 12; and.b32 u, u, 0x80008000; shl.b32 v, t, 6; and.b32 v, v, 0x01C001C0; or.b32 u, u, v;
        mul.rn.bf16x2 ${low}, u, ${factor};
        shl.b32 u, t, 8; and.b32 u, u, 0x80008000; shl.b32 v, t, 2; and.b32 v, v, 0x01C001C0; or.b32 u, u, v;
        mul.rn.bf16x2 ${high}, u, ${factor};"""
    asm = tl.constexpr("{ .reg .b32 t, u, v;" + pair.format(select="0x4140", low=0, high=2, factor=5)
                       + pair.format(select="0x4342", low=1, high=3, factor=6) + "\n}")

    @triton.jit
    def fp4_pairs(packed, factor):
        """``(N, J)`` packed bytes and a bf16 factor per byte -> ``(even, odd)``: each byte's low and high nibble
        decoded to bf16 and multiplied by the factor (``factor_bf16``: 2^(s - 1), which makes the value
        ``fp4 * 2^(s - 127)``), exactly, four bytes per step in 32-bit registers.

        A nibble's sign goes to bit 15 of a bf16 and its e2m1 bits to bits 6..8: that bf16 is fp4 * 2^-126 exactly
        (bf16's exponent bias is 127, e2m1's 1; e2m1's subnormal 0.5 lands on bf16's subnormals, which the packed
        bf16 multiply keeps). ``prmt`` spreads two bytes into the low bytes of two 16-bit lanes, then a shift and a
        mask per field places both lanes' nibbles at once."""
        return tl.inline_asm_elementwise(asm, "=r,=r,=r,=r,r,r,r", [packed, factor], dtype=(tl.bfloat16, tl.bfloat16),
                                         is_pure=True, pack=4)

    @triton.jit
    def factor_bf16(exponent):
        """E8M0 byte ``s`` (at most FAST_MAX_SCALE) -> 2^(s - 1) in bf16, from its bits."""
        return ((exponent.to(tl.int16) + 126) << 7).to(tl.bfloat16, bitcast=True)

    return fp4_pairs, factor_bf16


@functools.lru_cache(maxsize=1)
def _fp4():
    import triton
    import triton.language as tl

    @triton.jit
    def fp4(code, lo, hi):
        """e2m1 code (0..15, bit 3 = sign) → its value (0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives) times ``lo * hi``,
        in that order (see ``pow2_pair``; 1.0, 1.0 for the bare value)."""
        # The fp32 bits are built directly (integer ops are cheaper than exp2 in a kernel bound by decoding):
        # exponent field e in 1..3 is 2^(e-1) * (1 + m/2), so the fp32 exponent is e + 126 and m the top mantissa
        # bit; e == 0 is 0 or 0.5 (0x3F000000). The sign bit is set directly, so code 8 is -0.0 as in ``unpack``.
        c = code.to(tl.int32)
        e = (c >> 1) & 3
        m = c & 1
        bits = tl.where(e == 0, m * 0x3F000000, ((e + 126) << 23) | (m << 22)) | ((c & 8) << 28)
        return bits.to(tl.float32, bitcast=True) * lo * hi

    return fp4


@functools.lru_cache(maxsize=1)
def _pow2_pair():
    import triton
    import triton.language as tl

    @triton.jit
    def pow2_pair(scale):
        """E8M0 byte ``s`` → ``2^(s - 127)`` as two normal fp32 powers of two whose product it is, built from their
        bits (``inference.model.mxfp4._pow2_pair``): ``v * lo * hi`` is ``ldexp(v, s - 127)``, so byte 255 (``2^128``,
        no fp32) overflows only where the product does and byte 0 (``2^-127``, subnormal) is exact."""
        k = scale.to(tl.int32) - 127                     # [-127, 128]
        half = k >> 1                                     # floor(k / 2): arithmetic shift
        lo = ((half + 127) << 23).to(tl.float32, bitcast=True)
        hi = ((k - half + 127) << 23).to(tl.float32, bitcast=True)
        return lo, hi

    return pow2_pair


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    fp4, pow2_pair = _fp4(), _pow2_pair()
    fp4_pairs, factor_bf16 = _fp4_pairs()

    @triton.jit
    def kernel(x_ptr, blocks_ptr, scales_ptr, experts_ptr, y_ptr, N, K, stride_be, stride_bn, stride_se, stride_sn,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FAST: tl.constexpr):
        row = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        e = tl.load(experts_ptr + row).to(tl.int64)
        offs_j = tl.arange(0, BLOCK_K // 2)                  # byte j holds values 2j (low nibble) and 2j + 1
        offs_g = tl.arange(0, BLOCK_K // 32)                 # the groups of 32 values (16 bytes) in a step
        w_rows = blocks_ptr + e * stride_be + offs_n[:, None].to(tl.int64) * stride_bn
        s_rows = scales_ptr + e * stride_se + offs_n[:, None].to(tl.int64) * stride_sn
        if FAST:
            # exact bf16 weights (fp4_pairs), products summed in a (N, K/2) fp32 tile, reduced once at the end
            offs_k = tl.arange(0, BLOCK_K)
            tile = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mask = mask_n[:, None] & (k0 + 2 * offs_j < K)[None, :]
                packed = tl.load(w_rows + (k0 // 2 + offs_j)[None, :], mask=mask, other=0)              # (N, K/2)
                exponent = tl.load(s_rows + (k0 // 32 + offs_j // 16)[None, :], mask=mask, other=127)   # (N, K/2)
                w_even, w_odd = fp4_pairs(packed, factor_bf16(exponent))
                xs = tl.load(x_ptr + row * K + k0 + offs_k, mask=k0 + offs_k < K, other=0.0).to(tl.float32)
                x_even, x_odd = tl.split(tl.reshape(xs, (BLOCK_K // 2, 2)))                            # (K/2,)
                tile += w_even.to(tl.float32) * x_even[None, :] + w_odd.to(tl.float32) * x_odd[None, :]
            tl.store(y_ptr + row * N + offs_n, tl.sum(tile, axis=1), mask=mask_n)
            return
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask_k = k0 + 2 * offs_j < K
            mask = mask_n[:, None] & mask_k[None, :]
            packed = tl.load(w_rows + (k0 // 2 + offs_j)[None, :], mask=mask, other=0)                 # (N, K/2)
            mask_g = mask_n[:, None] & (k0 + 32 * offs_g < K)[None, :]
            exponent = tl.load(s_rows + (k0 // 32 + offs_g)[None, :], mask=mask_g, other=127)          # (N, K/32)
            x_even = tl.load(x_ptr + row * K + k0 + 2 * offs_j, mask=mask_k, other=0.0).to(tl.float32)
            x_odd = tl.load(x_ptr + row * K + k0 + 2 * offs_j + 1, mask=mask_k, other=0.0).to(tl.float32)
            pair = fp4(packed & 15, 1.0, 1.0) * x_even[None, :] + fp4(packed >> 4, 1.0, 1.0) * x_odd[None, :]
            # each group's 32 products summed, then scaled once: 2**(s - 127) as two factors (pow2_pair)
            group = tl.sum(tl.reshape(pair, (BLOCK_N, BLOCK_K // 32, 16)), axis=2)                      # (N, K/32)
            scale_lo, scale_hi = pow2_pair(exponent)
            acc += tl.sum(group * scale_lo * scale_hi, axis=1)
        tl.store(y_ptr + row * N + offs_n, acc, mask=mask_n)

    return kernel


def mxfp4_decode(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`inference.model.mxfp4.unpack` of ``blocks (E, R, G, 16)`` / ``scales (E, R, G)`` (views with any strides
    on the first two dimensions, e.g. a slice of rows or of groups) -> contiguous ``(E, R, G * 32)`` of ``dtype``."""
    E, R, G, half_group = blocks.shape
    if half_group != 16 or blocks.stride(3) != 1 or blocks.stride(2) != 16 or scales.stride(2) != 1:
        raise ValueError("mxfp4_decode needs whole groups of 16 contiguous bytes")
    out = torch.empty(E, R, G * 32, dtype=dtype, device=blocks.device)
    groups = R * G
    grid = (E, -(-groups // _DECODE_GROUPS))
    _decode_kernel()[grid](blocks, scales, out, G, groups, blocks.stride(0), blocks.stride(1), scales.stride(0),
                           scales.stride(1), BLOCK_Q=_DECODE_GROUPS, num_warps=4)
    return out


_DECODE_GROUPS = 128   # 32-value groups per program: 2 KiB read, 8 KiB of bf16 written


@functools.lru_cache(maxsize=1)
def _decode_kernel():
    import triton
    import triton.language as tl

    fp4, pow2_pair = _fp4(), _pow2_pair()

    @triton.jit
    def kernel(blocks_ptr, scales_ptr, out_ptr, G, groups, sb_e, sb_r, ss_e, ss_r, BLOCK_Q: tl.constexpr):
        # A tile of BLOCK_Q groups of expert e, numbered row-major over (row, group): each group's 16 bytes are
        # contiguous in the input and its 32 values contiguous in the output, so loads and stores are wide.
        e = tl.program_id(0).to(tl.int64)
        q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)                       # (Q,) group numbers
        mask = q < groups
        row, group = (q // G).to(tl.int64), (q % G).to(tl.int64)
        byte = tl.arange(0, 16)
        src = blocks_ptr + e * sb_e + row[:, None] * sb_r + group[:, None] * 16 + byte[None, :]   # (Q, 16)
        packed = tl.load(src, mask=mask[:, None], other=0)
        exponent = tl.load(scales_ptr + e * ss_e + row * ss_r + group, mask=mask, other=127)     # (Q,)
        scale_lo, scale_hi = pow2_pair(exponent)
        scale_lo, scale_hi = scale_lo[:, None], scale_hi[:, None]                              # (Q, 1) each
        values = tl.interleave(fp4(packed & 15, scale_lo, scale_hi),
                               fp4(packed >> 4, scale_lo, scale_hi))                           # (Q, 32), low first
        dst = out_ptr + e * groups * 32 + q.to(tl.int64)[:, None] * 32 + tl.arange(0, 32)[None, :]
        tl.store(dst, values.to(out_ptr.dtype.element_ty), mask=mask[:, None])

    return kernel
