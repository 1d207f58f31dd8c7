"""The training loss: the weighted next-token loss of :func:`inference.loss.weighted_nll` with a chunked backward.

Past ``chunk`` weighted tokens, :func:`linear_cross_entropy` walks the output layer's logits in chunks of rows,
forward and backward (the backward recomputes each chunk's logits, or, with a frozen output layer, keeps each
chunk's input gradient from the forward), so a step holds ``chunk x 201,088`` floats instead of ``N x 201,088``.
The weighting and the choice of rows are evaluation's (:mod:`inference.loss`), so the two report the same numbers.

With the output layer in host memory (``model.lm_head: cpu``, :class:`finetune.model.lora.HostLMHead`),
:func:`streamed_cross_entropy` reads it in slices of vocabulary rows instead, twice per step (once for each row's
log-sum-exp, once for the gradient), so the GPU holds one slice of the 1.08 GiB layer at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inference.loss import CHUNK_ROWS, chunked_cross_entropy, weighted_nll
from inference.model.compiled import fused

QUANTIZED_CHUNK_ROWS = 256   # for memory-bound (QLoRA) training: 206 MB per chunk, the output layer stays busy


@fused
def _loss_and_grad_rows(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``logits (c, V)``: the loss (fp32) and ``softmax - onehot`` (``d loss / d logits``, logits' dtype).

    One fused pass on CUDA (the fp32 logits are never written out), the same expression elsewhere.
    """
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    loss = lse - x.gather(1, targets[:, None]).squeeze(1)
    onehot = torch.arange(x.shape[1], device=x.device)[None, :] == targets[:, None]
    return loss, (torch.exp(x - lse[:, None]) - onehot.to(x.dtype)).to(logits.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-row ``-log softmax(hidden @ weight.T)[target]`` without materialising all logits.

    When only ``hidden`` needs a gradient (the output layer is frozen, as in LoRA training), each chunk's
    ``d loss_i / d hidden_i`` is computed right away while its logits are at hand, and the backward only scales those
    rows by the incoming gradient: loss ``i`` depends on row ``i`` alone, so this is exact, and it saves recomputing
    every chunk's logits. Otherwise the backward recomputes them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        # hidden (N, H), weight (V, H), targets (N,) -> losses (N,) fp32
        early = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        grad_rows = None
        if early:
            losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            grad_rows = torch.empty_like(hidden)                                      # (N, H)
            for s in range(0, hidden.shape[0], chunk):
                losses[s:s + chunk], d_logits = _loss_and_grad_rows(hidden[s:s + chunk] @ weight.T,  # (c, V)
                                                                    targets[s:s + chunk])
                grad_rows[s:s + chunk] = d_logits @ weight
        else:   # evaluation's chunked forward; the backward recomputes each chunk's logits
            losses = chunked_cross_entropy(hidden, weight, targets, chunk)
        ctx.chunk, ctx.early = chunk, early
        ctx.save_for_backward(grad_rows if early else hidden, weight, targets)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        if ctx.early:
            grad_rows, _, _ = ctx.saved_tensors
            return grad_rows * grad_losses[:, None].to(grad_rows.dtype), None, None, None
        hidden, weight, targets = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s:s + ctx.chunk]
            probs = torch.softmax((h @ weight.T).float(), dim=-1)                     # (c, V)
            rows = torch.arange(h.shape[0], device=h.device)
            probs[rows, targets[s:s + ctx.chunk]] -= 1.0                               # d loss / d logits
            probs *= grad_losses[s:s + ctx.chunk, None]
            d_logits = probs.to(h.dtype)
            if want_h:
                grad_h[s:s + ctx.chunk] = d_logits @ weight
            if want_w:
                grad_w += (d_logits.T @ h).float()
        return grad_h, (grad_w.to(weight.dtype) if want_w else None), None, None


# Vocabulary rows of a host-held output layer sent to the GPU at once: 16,384 x 2,880 bf16 is 90 MB, and a chunk of
# rows' fp32 logits against it 16 MB per 256 rows.
HEAD_SLICE_ROWS = 16384


def head_slices(weight: torch.Tensor, device: torch.device, rows: int = HEAD_SLICE_ROWS):
    """(first vocabulary row, that slice of ``weight (V, H)`` on ``device``) for each slice of ``rows`` rows."""
    for v in range(0, weight.shape[0], rows):
        yield v, weight[v:v + rows].to(device, non_blocking=True)


def _in_slice(targets: torch.Tensor, first: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(each target's column within the slice starting at vocabulary row ``first``, clamped; whether it is in it)."""
    t = targets - first
    inside = (t >= 0) & (t < size)
    return t.clamp(0, size - 1), inside


class _StreamedCrossEntropy(torch.autograd.Function):
    """Per-row ``-log softmax(hidden @ weight.T)[target]`` with ``weight`` frozen and anywhere (host memory), read in
    slices of vocabulary rows: pass 1 builds each row's log-sum-exp (running max and sum, fp32) and target logit; pass
    2, when ``hidden`` needs a gradient, accumulates ``d loss_i / d hidden_i = sum_v (p_iv - [v = t_i]) w_v`` in fp32,
    kept until the backward scales it by the incoming gradient (loss ``i`` depends on row ``i`` alone: exact)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, rows):
        # hidden (N, H) on the compute device, weight (V, H) anywhere, targets (N,) -> losses (N,) fp32
        n, dev = hidden.shape[0], hidden.device
        top = torch.full((n,), float("-inf"), dtype=torch.float32, device=dev)
        total = torch.zeros(n, dtype=torch.float32, device=dev)
        picked = torch.zeros(n, dtype=torch.float32, device=dev)
        for v, w in head_slices(weight, dev, rows):
            for s in range(0, n, chunk):
                logits = (hidden[s:s + chunk] @ w.T).float()                            # (c, slice)
                m = torch.maximum(top[s:s + chunk], logits.max(dim=-1).values)
                total[s:s + chunk] = total[s:s + chunk] * torch.exp(top[s:s + chunk] - m) + \
                    torch.exp(logits - m[:, None]).sum(-1)
                top[s:s + chunk] = m
                t, inside = _in_slice(targets[s:s + chunk], v, w.shape[0])
                picked[s:s + chunk] += torch.where(inside, logits.gather(1, t[:, None]).squeeze(1), 0.0)
        lse = top + torch.log(total)
        grad_rows = None
        if ctx.needs_input_grad[0]:
            grad_rows = torch.zeros(hidden.shape, dtype=torch.float32, device=dev)      # (N, H)
            for v, w in head_slices(weight, dev, rows):
                for s in range(0, n, chunk):
                    p = torch.exp((hidden[s:s + chunk] @ w.T).float() - lse[s:s + chunk, None])   # (c, slice)
                    t, inside = _in_slice(targets[s:s + chunk], v, w.shape[0])
                    # minus 1 at each row's target where it falls in this slice (minus 0 elsewhere: exact), without
                    # the host synchronisation that selecting those rows would cost per chunk and slice
                    p.scatter_add_(1, t[:, None], -inside.to(p.dtype)[:, None])
                    # in the compute dtype as the resident path's d_logits @ weight, summed over slices in fp32
                    grad_rows[s:s + chunk] += (p.to(hidden.dtype) @ w).float()
        ctx.save_for_backward(grad_rows)
        ctx.dtype = hidden.dtype
        return lse - picked

    @staticmethod
    def backward(ctx, grad_losses):
        (grad_rows,) = ctx.saved_tensors
        return (grad_rows * grad_losses[:, None]).to(ctx.dtype), None, None, None, None


def streamed_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           chunk: int = CHUNK_ROWS, rows: int = HEAD_SLICE_ROWS) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets, reduction="none")`` for a frozen ``weight (V, H)`` held anywhere
    (host memory), read ``rows`` vocabulary rows at a time; gradients for ``hidden`` only."""
    return _StreamedCrossEntropy.apply(hidden, weight, targets, chunk, rows)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets, reduction="none")`` in row chunks (same values, less memory).

    Up to ``chunk`` rows it is exactly that plain expression (cheaper: no recomputation in the backward).
    """
    if hidden.shape[0] <= chunk:
        return F.cross_entropy((hidden @ weight.T).float(), targets, reduction="none")
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)


def causal_lm_parts(model):
    """(backbone, lm_head) of a gpt-oss causal LM, unwrapping a PEFT model if needed."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.lm_head


def _packed_masks(backbone, input_ids: torch.Tensor, position_ids: torch.Tensor) -> dict | None:
    """For transformers' own attention (eager, sdpa): its block-diagonal masks of packed rows, made by its own mask
    builders from the positions (gpt-oss's forward does not hand them the positions, so it would build plain causal
    masks). Our attention needs none: it reads the sequences' offsets (``finetune.kernels.attention``)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    if backbone.config._attn_implementation not in ("eager", "sdpa"):
        return None
    shape = torch.empty(*input_ids.shape, 0, dtype=backbone.embed_tokens.weight.dtype, device=input_ids.device)
    kwargs = {"config": backbone.config, "inputs_embeds": shape, "attention_mask": None, "cache": None,
              "position_ids": position_ids}
    return {"full_attention": create_causal_mask(**kwargs),
            "sliding_attention": create_sliding_window_causal_mask(**kwargs)}


def weighted_loss_sum(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, weights: torch.Tensor,
                      chunk: int = CHUNK_ROWS, targets: torch.Tensor | None = None, packed: dict | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum over tokens of ``weight * -log p(target | prefix)`` for a transformers causal LM (PEFT-wrapped or not).

    ``input_ids``, ``attention_mask``, ``weights``, ``targets``: ``(B, T)``; ``weights[b, t]`` weighs predicting
    ``targets[b, t]`` from the tokens before position ``t`` (so position 0 is never predicted). ``targets`` defaults
    to ``input_ids`` (plain next-token prediction); Harmony training data differs only where history stores an answer
    with ``<|end|>`` and the model is trained to emit ``<|return|>``. Returns ``(weighted_sum, weight_total,
    token_count)``, where ``token_count`` counts the tokens with non-zero weight. ``chunk``: logits rows at once.
    ``packed``: rows holding several sequences (``finetune.train.trainer.packed_inputs``: ``position_ids`` restarting
    per sequence and the flash-attention offsets); transformers' attention then gets block-diagonal masks
    (:func:`_packed_masks`), ours reads the offsets.
    """
    backbone, head = causal_lm_parts(model)
    if packed:
        masks = _packed_masks(backbone, input_ids, packed["position_ids"])
        hidden = backbone(input_ids=input_ids, attention_mask=masks, use_cache=False, **packed).last_hidden_state
    else:
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    # an output layer in host memory (finetune.model.lora.HostLMHead, which says so) is read in slices of rows
    streamed = getattr(head, "streamed", False)
    return weighted_nll(hidden, head.weight, head.bias, input_ids if targets is None else targets, weights, chunk,
                        cross_entropy=streamed_cross_entropy if streamed else linear_cross_entropy)
