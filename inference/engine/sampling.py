"""Choosing next tokens for a batch of sequences, each with its own temperature, top-p and seeded generator.

Greedy rows take the argmax. Sampled rows follow the usual order: temperature, then nucleus filtering (the smallest
set of most likely tokens whose mass reaches top-p, the token that crosses it included), then a draw. The draw is
the Gumbel-max trick: ``argmax(logits / T + g)`` with ``g = -log(-log(u))`` for uniform noise ``u`` from the
request's own seeded generator, which samples exactly ``softmax(logits / T)``. Unlike walking a cumulative sum over
the ~200k-token vocabulary, whose rounding moves with anything else in the batch, the winner changes only if two
perturbed scores tie within rounding, so a seeded request gets the same tokens alone or in any batch (on one device;
the noise comes from that device's generator).
"""

from __future__ import annotations

import torch


def generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A request's own generator on the model's device (a fresh random seed when none is given)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else int(torch.seed()))
    return g


def choose(logits: torch.Tensor, temperatures: list[float], top_ps: list[float],
           generators: list[torch.Generator | None]) -> list[int]:
    """Next tokens for ``logits (n, V)``: row ``i`` greedy when ``temperatures[i] == 0``, else drawn with
    ``generators[i]``."""
    greedy = torch.argmax(logits, dim=-1)                                              # (n,)
    sampled = [i for i, t in enumerate(temperatures) if t > 0]
    if not sampled:
        return greedy.tolist()
    device = logits.device
    rows = torch.tensor(sampled, device=device)
    temps = torch.tensor([temperatures[i] for i in sampled], device=device, dtype=torch.float32)[:, None]
    scores = logits[rows].float() / temps                                              # (s, V)
    top_p = torch.tensor([top_ps[i] for i in sampled], device=device, dtype=torch.float32)[:, None]
    if bool((top_p < 1).any()):
        probs = torch.softmax(scores, dim=-1)
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p                                 # past the nucleus
        drop[:, 0] = False                                                             # the top token always stays
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    noise = torch.stack([torch.rand(scores.shape[1], generator=generators[i], device=device) for i in sampled])
    gumbel = -torch.log(-torch.log(noise))                                             # u = 0 gives -inf: never
    out = greedy.clone()
    out[rows] = torch.argmax(scores + gumbel, dim=-1)
    return out.tolist()
