"""gpt-oss attention (learned sinks, optional sliding window, GQA) as a fused kernel with an exact backward.

gpt-oss adds one learned logit per head (the sink) to every softmax row; it takes probability mass but has no value.
A flash-attention kernel computes ``out = softmax(S) V`` and the row log-sum-exp ``lse`` without the sink; the sink
is folded in afterwards:

    lse_c = logaddexp(lse, sink)        out_f = out * exp(lse - lse_c)

which is exactly ``softmax([S, sink])[:, :-1] V``. For the backward, the standard attention backward fed with
``(out_f, lse_c)`` instead of ``(out, lse)`` is exact: it recomputes ``P = exp(S - lse_c)`` (the probabilities *with*
the sink) and ``D = rowsum(dO * out_f)``, and the sink column has no value, so it adds nothing else. The sink's own
gradient is ``-sum_rows exp(sink - lse_c) * D``.

On CUDA with bf16/fp16 the kernel is PyTorch's flash attention (``aten._flash_attention_forward/backward``, which
takes the sliding window and fewer key/value heads directly). Elsewhere the same autograd function runs its plain
twin (:func:`_math_forward` / :func:`_math_backward`: dense scores in fp32), which is the reference in the CPU tests.

Layout: ``q (B, S, Hq, D)``, ``k``/``v (B, S, Hkv, D)``; a window ``w`` lets query ``i`` see keys ``i-w+1 .. i``
(transformers' convention for gpt-oss's 128-token layers).

Packed rows (``data.packing``): several conversations one after another in a row, described by :class:`Packed`
(offsets of every sequence in the flattened ``B * S`` tokens, each sequence within one row). A token then sees only
earlier tokens of its own sequence: flash attention's variable-length mode on CUDA, a block-diagonal mask in the
plain twin. The window counts within the sequence, which is the same as counting within the row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inference.model.compiled import fused

# Tokens of a step (batch x sequence) up to which the backward runs all heads in one call; above, one key/value head
# at a time. Flash attention's backward with fewer key/value heads than query heads holds, beside dq, dk, dv, an fp32
# dq accumulator and dk, dv expanded to every query head: 32 KB a token for gpt-oss's 64 x 64 heads, about a third
# of what a long sequence's layer backward holds at its peak (finetune.estimate counts it; measured 93 KB a token in
# all). Per key/value head (8 query heads) that scratch is an eighth, for eight launches instead of one.
WHOLE_BACKWARD_TOKENS = 16384


@dataclass(frozen=True)
class Packed:
    """Sequences packed into rows: ``cu_seqlens (n + 1,)`` int32 start offsets of the ``n`` sequences in the
    flattened ``(B * S)`` tokens (then the total), every sequence inside one row; ``max_len`` the longest."""
    cu_seqlens: torch.Tensor
    max_len: int

    def segments(self, b: int, n: int) -> torch.Tensor:
        """(B, S) index of the sequence each token belongs to."""
        tokens = torch.arange(b * n, device=self.cu_seqlens.device, dtype=self.cu_seqlens.dtype)
        return torch.searchsorted(self.cu_seqlens[1:].contiguous(), tokens, right=True).view(b, n)


def _mask(n_q: int, n_k: int, window: int | None, device, segments: torch.Tensor | None = None) -> torch.Tensor:
    """(n_q, n_k) True where query i may see key j (causal, within the window); (B, 1, n, n) with ``segments (B, n)``:
    also within the same packed sequence."""
    i = torch.arange(n_q, device=device)[:, None] + (n_k - n_q)
    j = torch.arange(n_k, device=device)[None, :]
    keep = j <= i
    if window is not None:
        keep &= j > i - window
    if segments is not None:
        keep = (keep[None] & (segments[:, :, None] == segments[:, None, :]))[:, None]
    return keep


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (the tests' oracle precision)."""
    return torch.promote_types(t.dtype, torch.float32)


def _scores(q, k, scale, window, packed=None):
    """Scores (B, Hq, S, S) in the accumulation dtype, masked entries at -inf; k expanded to the query heads."""
    groups = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2).to(_acc(q))                                   # (B, Hq, S, D)
    kh = k.transpose(1, 2).to(_acc(q)).repeat_interleave(groups, dim=1)  # (B, Hq, S, D)
    s = qh @ kh.transpose(-1, -2) * scale
    segments = packed.segments(q.shape[0], q.shape[1]) if packed is not None else None
    return s.masked_fill(~_mask(q.shape[1], k.shape[1], window, q.device, segments), float("-inf"))


def _math_forward(q, k, v, scale, window, packed=None):
    """(out (B, S, Hq, D) in q's dtype, lse (B, Hq, S) fp32) of causal softmax attention without sinks."""
    groups = q.shape[2] // k.shape[2]
    s = _scores(q, k, scale, window, packed)
    lse = torch.logsumexp(s, dim=-1)
    vh = v.transpose(1, 2).to(_acc(q)).repeat_interleave(groups, dim=1)
    out = torch.exp(s - lse[..., None]) @ vh                          # (B, Hq, S, D)
    return out.transpose(1, 2).to(q.dtype), lse


def _math_backward(grad, q, k, v, out, lse, scale, window, packed=None):
    """The attention backward given the output and row log-sum-exp it was normalised with."""
    b, n, hq, d = q.shape
    hkv = k.shape[2]
    groups = hq // hkv
    p = torch.exp(_scores(q, k, scale, window, packed) - lse[..., None])     # (B, Hq, S, S)
    g = grad.transpose(1, 2).to(_acc(q))                                 # (B, Hq, S, D)
    vh = v.transpose(1, 2).to(_acc(q)).repeat_interleave(groups, dim=1)
    dv = p.transpose(-1, -2) @ g
    dp = g @ vh.transpose(-1, -2)
    delta = (g * out.transpose(1, 2).to(_acc(q))).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    qh = q.transpose(1, 2).to(_acc(q))
    kh = k.transpose(1, 2).to(_acc(q)).repeat_interleave(groups, dim=1)
    dq = ds @ kh * scale
    dk = ds.transpose(-1, -2) @ qh * scale
    # fold the query heads of each key/value head back: (B, Hq, S, D) -> (B, Hkv, S, D)
    dk = dk.view(b, hkv, groups, n, d).sum(2)
    dv = dv.view(b, hkv, groups, n, d).sum(2)
    return (dq.transpose(1, 2).to(q.dtype), dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype))


def uses_flash(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 256


def _flash_window(window):
    # flash's left window counts keys before the query: keys i-w+1 .. i is a left window of w-1
    return (window - 1, 0) if window is not None else (None, None)


@fused
def _fold_sinks(out, lse, sinks):
    """(out_f (B, S, Hq, D), lse_c (B, Hq, S)) from the sink-free output and log-sum-exp."""
    acc = _acc(out)
    lse_c = torch.logaddexp(lse.to(acc), sinks.to(acc)[None, :, None])
    keep = torch.exp(lse.to(acc) - lse_c)                                    # mass not taken by the sink
    return (out.to(acc) * keep.transpose(1, 2)[..., None]).to(out.dtype), lse_c


@fused
def _sink_grad(grad, out_f, sinks, lse_c):
    """d loss / d sinks (Hq,) = -sum over rows of p_sink * rowsum(dO * out_f)."""
    acc = _acc(out_f)
    delta = (grad.to(acc) * out_f.to(acc)).sum(-1).transpose(1, 2)            # (B, Hq, S)
    return -(torch.exp(sinks.to(acc)[None, :, None] - lse_c) * delta).sum(dim=(0, 2)).to(sinks.dtype)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(B, S, H, D) -> (B * S, H, D): flash's variable-length layout."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


class _SinkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, scale, window, packed):
        b, n, hq, d = q.shape
        if uses_flash(q):
            left, right = _flash_window(window)
            if packed is None:
                out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
                    q, k, v, None, None, n, k.shape[1], 0.0, True, False, scale=scale,
                    window_size_left=left, window_size_right=right)
                lse = lse[:, :, :n]
            else:                # variable length: out (B*S, Hq, D), lse (Hq, B*S)
                cu = packed.cu_seqlens
                out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
                    _flat(q), _flat(k), _flat(v), cu, cu, packed.max_len, packed.max_len, 0.0, True, False,
                    scale=scale, window_size_left=left, window_size_right=right)
                out, lse = out.view(b, n, hq, d), lse[:, :b * n].reshape(hq, b, n).transpose(0, 1)
            ctx.flash = (rng, unused)
        else:
            out, lse = _math_forward(q, k, v, scale, window, packed)
            ctx.flash = None
        out_f, lse_c = _fold_sinks(out, lse, sinks)
        ctx.save_for_backward(q, k, v, sinks, out_f, lse_c)
        ctx.scale, ctx.window, ctx.packed = scale, window, packed
        return out_f

    @staticmethod
    def backward(ctx, grad):
        q, k, v, sinks, out_f, lse_c = ctx.saved_tensors
        grad = grad.contiguous()
        dsinks = _sink_grad(grad, out_f, sinks, lse_c) if ctx.needs_input_grad[3] else None
        b, n, hq, _ = q.shape
        hkv = k.shape[2]
        if b * n <= WHOLE_BACKWARD_TOKENS or hkv == hq:
            dq, dk, dv = _backward(ctx, grad, q, k, v, out_f, lse_c)
            return dq, dk, dv, dsinks, None, None, None
        # One key/value head and its query heads at a time (see WHOLE_BACKWARD_TOKENS): the kernel's scratch
        # follows one group; the gradients are each head's own, so the result is the same.
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        g = hq // hkv
        for h in range(hkv):
            heads = slice(h * g, (h + 1) * g)
            dq[:, :, heads], dk[:, :, h:h + 1], dv[:, :, h:h + 1] = _backward(
                ctx, grad[:, :, heads].contiguous(), q[:, :, heads].contiguous(), k[:, :, h:h + 1].contiguous(),
                v[:, :, h:h + 1].contiguous(), out_f[:, :, heads].contiguous(), lse_c[:, heads].contiguous())
        return dq, dk, dv, dsinks, None, None, None


def _backward(ctx, grad, q, k, v, out_f, lse_c):
    """(dq, dk, dv) of the sink-free attention given the sink-folded output and log-sum-exp (module docstring)."""
    packed = ctx.packed
    if ctx.flash is None:
        return _math_backward(grad, q, k, v, out_f, lse_c, ctx.scale, ctx.window, packed)
    left, right = _flash_window(ctx.window)
    rng, unused = ctx.flash
    if packed is None:
        return torch.ops.aten._flash_attention_backward(
            grad, q, k, v, out_f, lse_c.contiguous(), None, None, q.shape[1], k.shape[1], 0.0, True, rng,
            unused, scale=ctx.scale, window_size_left=left, window_size_right=right)
    b, n, hq, _ = q.shape
    cu = packed.cu_seqlens
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        _flat(grad), _flat(q), _flat(k), _flat(v), _flat(out_f),
        lse_c.transpose(0, 1).reshape(hq, b * n).contiguous(), cu, cu, packed.max_len, packed.max_len,
        0.0, True, rng, unused, scale=ctx.scale, window_size_left=left, window_size_right=right)
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, scale: float,
                   window: int | None = None, packed: Packed | None = None) -> torch.Tensor:
    """Causal attention with per-head sinks: ``q (B, S, Hq, D)``, ``k``/``v (B, S, Hkv, D)``, ``sinks (Hq,)``;
    ``packed``: the sequences packed into the rows (attention stays within each)."""
    return _SinkAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), sinks, scale, window, packed)
