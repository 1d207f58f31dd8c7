"""The weighted next-token loss, computing output-layer logits only where a token carries weight, in chunks.

gpt-oss's output layer has 201,088 rows; most tokens of a chat (system, user, tool) carry no loss, so projecting
every position wastes most of the work (on a tiny model, ~10x). Past ``CHUNK_ROWS`` weighted tokens the logits are
not held all at once either (:func:`chunked_cross_entropy`). Evaluation (``inference.evaluate``) and training
(``finetune.kernels.loss``, which adds a chunked backward) share :func:`weighted_nll`, so their numbers mean the same
thing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ROWS = 1024  # 1024 x 201,088 fp32 logits = 824 MB per chunk at most


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets, reduction="none")`` (fp32), ``hidden (N, H)``, ``weight (V, H)``,
    holding at most ``chunk x V`` logits at once. For evaluation: under autograd every chunk's logits would be kept
    for the backward (training's chunked version recomputes them instead)."""
    if hidden.shape[0] <= chunk:
        return F.cross_entropy((hidden @ weight.T).float(), targets, reduction="none")
    losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk):
        logits = (hidden[s:s + chunk] @ weight.T).float()                            # (c, V)
        losses[s:s + chunk] = torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[s:s + chunk, None]).squeeze(1)
    return losses


def weighted_nll(hidden: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor | None,
                 targets: torch.Tensor, weights: torch.Tensor, chunk: int = CHUNK_ROWS,
                 cross_entropy=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum over tokens of ``weight * -log p(target | prefix)`` from final hidden states ``(B, T, H)`` and the output
    layer ``(V, H)``: ``weights[b, t]`` weighs predicting ``targets[b, t]`` from the positions before ``t`` (so position
    0 is never predicted); ``targets`` ``(B, T)`` are read only where ``weights > 0``. Returns ``(weighted_sum,
    weight_total, token_count)``, ``token_count`` counting the tokens with non-zero weight.

    ``cross_entropy(hidden (N, H), weight (V, H), targets (N,), chunk) -> (N,)``: :func:`chunked_cross_entropy`
    unless given (training passes one with a chunked backward, ``finetune.kernels.loss``).
    """
    target_w = weights[:, 1:].to(torch.float32)          # (B, T-1)
    keep = target_w > 0
    picked = hidden[:, :-1][keep]                        # (N, H): only positions that predict a weighted token
    wanted = targets[:, 1:][keep]                        # (N,)
    if head_bias is not None:  # gpt-oss has no output bias; keep the plain path for heads that do
        nll = F.cross_entropy(F.linear(picked, head_weight, head_bias).float(), wanted, reduction="none")
    else:
        nll = (cross_entropy or chunked_cross_entropy)(picked, head_weight, wanted, chunk)
    w = target_w[keep]
    return (nll * w).sum(), w.sum(), keep.sum()
