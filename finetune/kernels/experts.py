"""The gpt-oss expert layer as grouped matmuls over tokens sorted by expert, with an optional LoRA side path.

One call routes ``T`` tokens to ``k`` experts each (``S = T * k`` rows). The rows are sorted by expert once per
layer; both projections (gate_up, then down) run as one grouped matmul over all experts, and a LoRA adapter on an
expert weight runs beside it as two thin grouped matmuls (``x @ A_e^T`` then ``@ B_e^T``), so ``W_e + B_e A_e`` is
never formed for all experts (PEFT's ``target_parameters`` path forms it on every forward).

The gather into expert order and the sum back per token are gathers forward *and* backward (each token appears
exactly ``k`` times, so its gradient is a sum over its ``k`` rows, and each row's gradient is its token's):
autograd's generic backward for indexing is a scatter-add with duplicate indices, which was a third of the
transformers + PEFT step on gpt-oss-20b shapes.

:func:`grouped_mm` uses ``torch.nn.functional.grouped_mm`` on CUDA (bf16) and a per-expert loop elsewhere (its
plain twin, the reference in the CPU tests). What follows each matmul (bias, LoRA output, gpt-oss's clamped
interleaved SwiGLU, the routing weight) is one fused kernel on CUDA (:mod:`inference.model.moe`'s epilogues, shared with
the runtime) and the same PyTorch expression elsewhere.

Expert weights may also be packed MXFP4 (:class:`finetune.kernels.packed.Mxfp4Weight`, as gpt-oss ships them).
Then the grouped matmul decodes them piece by piece (:func:`mxfp4_grouped_mm`): at most :func:`decode_budget` bytes
of decoded weights exist at a time, forward and backward, and the backward computes only the input gradient (the
base weights are frozen).
"""

from __future__ import annotations

import torch

from finetune.kernels.packed import Mxfp4Weight
from inference.model import mxfp4
from inference.model.moe import decode, down_epilogue, gate_up_epilogue

# Decoded MXFP4 expert weights held at once. None: an eighth of the projection being multiplied, kept within
# [64 MiB, 512 MiB] (gpt-oss-20b's gate_up decodes to 1.06 GB: 132 MiB slices; gpt-oss-120b's to 4.2 GB: 512 MiB);
# an int: that many bytes. Smaller slices save memory and cost one more decode + matmul launch each.
DECODE_BUDGET_BYTES: int | None = None
DECODE_SHARE, DECODE_MIN_BYTES, DECODE_MAX_BYTES = 8, 64 * 2**20, 512 * 2**20


def decode_budget(projection_bytes: int) -> int:
    """Bytes of decoded weights to hold at once for an expert projection of ``projection_bytes`` decoded."""
    if DECODE_BUDGET_BYTES is not None:
        return DECODE_BUDGET_BYTES
    return min(max(projection_bytes // DECODE_SHARE, DECODE_MIN_BYTES), DECODE_MAX_BYTES)


def _gmm_loop(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The plain twin of grouped_mm: rows ``offs[e-1]:offs[e]`` of ``x (S, K)`` times ``w[e] (K, N)``."""
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    parts = [x[s:e] @ w[i] for i, (s, e) in enumerate(zip(starts, ends))]
    return torch.cat(parts, dim=0) if parts else x.new_zeros(0, w.shape[-1])


def _dense_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if x.is_cuda and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16:
        return torch.nn.functional.grouped_mm(x, w, offs=offs)
    return _gmm_loop(x, w, offs)


def _chunk(total: int, bytes_per_unit: int, multiple: int) -> int:
    """How many units (output features forward, input features backward) to decode at once within the budget."""
    budget = decode_budget(total * bytes_per_unit)
    units = max(multiple, budget // max(bytes_per_unit, 1) // multiple * multiple)
    return min(total, units)


@torch.library.custom_op("finetune::mxfp4_grouped_mm", mutates_args=())
def mxfp4_grouped_mm(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``x (S, K)`` grouped by expert times the MXFP4 experts ``blocks (E, N, K/32, 16)`` (rows = outputs) ->
    ``(S, N)``, decoding a slice of output features of all experts at a time.

    Slicing outputs (not experts) keeps the row groups whole, so no expert offsets have to be read back to the host.
    One custom op (forward and backward) so that selective checkpointing can keep or recompute it as a whole.
    """
    experts, n_out, groups, _ = blocks.shape
    step = _chunk(n_out, experts * groups * mxfp4.GROUP * x.element_size(), 16)
    if step == n_out:
        return _dense_mm(x, decode(blocks, scales, x.dtype).transpose(1, 2), offs)
    out = x.new_empty(x.shape[0], n_out)
    for n0 in range(0, n_out, step):
        w = decode(blocks[:, n0:n0 + step], scales[:, n0:n0 + step], x.dtype)      # (E, n, K)
        out[:, n0:n0 + step] = _dense_mm(x, w.transpose(1, 2), offs)
    return out


@torch.library.custom_op("finetune::mxfp4_grouped_mm_t", mutates_args=())
def mxfp4_grouped_mm_t(grad: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                       offs: torch.Tensor) -> torch.Tensor:
    """The input gradient of :func:`mxfp4_grouped_mm`: ``grad (S, N)`` times each expert's ``W_e^T`` -> ``(S, K)``,
    decoding a slice of input features (whole 32-value groups) at a time."""
    experts, n_out, groups, _ = blocks.shape
    step = _chunk(groups, experts * n_out * mxfp4.GROUP * grad.element_size(), 1)
    if step == groups:
        return _dense_mm(grad, decode(blocks, scales, grad.dtype), offs)
    out = grad.new_empty(grad.shape[0], groups * mxfp4.GROUP)
    for g0 in range(0, groups, step):
        w = decode(blocks[:, :, g0:g0 + step], scales[:, :, g0:g0 + step], grad.dtype)   # (E, N, k)
        out[:, g0 * mxfp4.GROUP:(g0 + step) * mxfp4.GROUP] = _dense_mm(grad, w, offs)
    return out


@mxfp4_grouped_mm.register_fake
def _(x, blocks, scales, offs):
    return x.new_empty(x.shape[0], blocks.shape[1])


@mxfp4_grouped_mm_t.register_fake
def _(grad, blocks, scales, offs):
    return grad.new_empty(grad.shape[0], blocks.shape[2] * mxfp4.GROUP)


def _setup(ctx, inputs, output):
    _, blocks, scales, offs = inputs
    ctx.save_for_backward(blocks, scales, offs)


def _backward(ctx, grad):
    blocks, scales, offs = ctx.saved_tensors
    return mxfp4_grouped_mm_t(grad.contiguous(), blocks, scales, offs), None, None, None


mxfp4_grouped_mm.register_autograd(_backward, setup_context=_setup)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``(S, K)`` rows grouped by expert (group ``e`` ends at ``offs[e]``) times ``w (E, K, N)`` -> ``(S, N)``.

    ``w`` dense, or packed MXFP4 (:class:`Mxfp4Weight`, frozen: no weight gradient).
    """
    if isinstance(w, Mxfp4Weight):
        return mxfp4_grouped_mm(x, w.blocks, w.scales, offs)
    return _dense_mm(x, w, offs)


def _sum_slots(rows: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    """``(S, H)`` rows in expert order -> ``(T, H)``: each token's ``k`` rows gathered and summed.

    Left to PyTorch's gather + sum: inductor's fused gather-reduction of this shape was 5x slower (measured, H200).
    """
    return rows[inverse].view(-1, k, rows.shape[-1]).sum(dim=1)


class _GatherTokens(torch.autograd.Function):
    """``x[order // k]`` (one row per routed (token, slot), in expert order); backward sums each token's k rows."""

    @staticmethod
    def forward(ctx, x, order, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x[order // k]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return _sum_slots(grad, inverse, ctx.k), None, None, None


class _SumTokens(torch.autograd.Function):
    """The dual of :class:`_GatherTokens`: ``(S, H)`` expert-order rows -> ``(T, H)`` per-token sums over k slots."""

    @staticmethod
    def forward(ctx, rows, order, inverse, k):
        ctx.save_for_backward(order)
        ctx.k = k
        return _sum_slots(rows, inverse, k)

    @staticmethod
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        return grad[order // ctx.k], None, None, None


LoraFactors = tuple[torch.Tensor, torch.Tensor, float]  # (lhs (E, in, r), rhs (E, r, out), scaling)


def _lora(x: torch.Tensor, factors: LoraFactors, offs: torch.Tensor) -> torch.Tensor:
    """``scaling * (x @ lhs_e) @ rhs_e`` per expert group: ``(S, in) -> (S, out)``."""
    lhs, rhs, scaling = factors
    lhs, rhs = lhs.to(x.dtype), rhs.to(x.dtype)
    r = lhs.shape[-1]
    if x.is_cuda and r % 8:
        # grouped_mm needs 16-byte aligned rows: pad the rank with zeros (no effect on values or gradients)
        pad = 8 - r % 8
        lhs = torch.nn.functional.pad(lhs, (0, pad))
        rhs = torch.nn.functional.pad(rhs, (0, 0, 0, pad))
    low = grouped_mm(x, lhs.contiguous(), offs)                         # (S, r)
    return grouped_mm(low, (rhs * scaling).contiguous(), offs)          # (S, out); scaling folded into the small B


def moe_experts(hidden: torch.Tensor, router_indices: torch.Tensor, routing_weights: torch.Tensor, *,
                gate_up: torch.Tensor, gate_up_bias: torch.Tensor, down: torch.Tensor, down_bias: torch.Tensor,
                alpha: float, limit: float, lora_gate_up: LoraFactors | None = None,
                lora_down: LoraFactors | None = None) -> torch.Tensor:
    """gpt-oss experts: ``hidden (T, H)``, ``router_indices``/``routing_weights (T, k)`` -> ``(T, H)``.

    ``gate_up (E, H, 2I)``, ``down (E, I, H)`` (transformers' layout), biases ``(E, 2I)`` / ``(E, H)``. The frozen
    weights get no gradient (none is computed unless they require it); LoRA factors, routing weights and ``hidden``
    do.
    """
    tokens, k = router_indices.shape
    num_experts = gate_up.shape[0]
    flat = router_indices.reshape(-1)                                          # (S,) expert of each routed row
    order = torch.argsort(flat, stable=True)                                   # expert order -> (token, slot) row
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    # rows per expert without a host sync (bincount reads the maximum back to size its output)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)                          # (E,) group ends
    expert = flat[order]                                                       # (S,) sorted expert ids

    x = _GatherTokens.apply(hidden, order, inverse, k)                         # (S, H)
    lora = _lora(x, lora_gate_up, offs) if lora_gate_up is not None else None
    h = gate_up_epilogue(grouped_mm(x, gate_up, offs), lora, gate_up_bias, expert, alpha, limit)   # (S, I)
    lora = _lora(h, lora_down, offs) if lora_down is not None else None
    y = down_epilogue(grouped_mm(h, down, offs), lora, down_bias, expert, routing_weights.reshape(-1)[order])
    return _SumTokens.apply(y, order, inverse, k).to(hidden.dtype)             # (T, H)
