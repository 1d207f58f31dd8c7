"""Token generation over the runtime's KV cache: one stream with sampling, or a greedy batch for evaluation.

This module knows tokens only (no Harmony text, no HTTP): :func:`stream_tokens` yields one id at a time and stops at
a stop token or after ``max_new`` tokens; closing the generator frees its cache at once. :func:`greedy_batch`
completes many prompts together (left-padded) for evaluation. Sampling follows the usual order: temperature, then
nucleus (top-p) filtering, then a draw from a seeded CPU generator, so a seed gives the same tokens on any device.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from inference.runtime import GptOss

PAD_ID = 199999  # <|endoftext|>: never attended (masked), only fills ragged batches
FIRST_RESERVE = 256  # KV columns reserved past the prompt; the cache doubles when a reply runs longer
GRAPH_MIN_TOKENS = 16     # shorter replies do not repay capturing a CUDA graph
GRAPH_MAX_TOKENS = 16384  # longer limits decode eagerly on a growing cache instead of reserving it all


def pad_rows(rows: list[list], value: float, left: bool = False, dtype=torch.long) -> torch.Tensor:
    """Stack ragged rows into ``(B, T_max)``, padding with ``value`` on the right (or the left, for generation)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        if r:
            if left:
                out[i, width - len(r):] = torch.tensor(r, dtype=dtype)
            else:
                out[i, :len(r)] = torch.tensor(r, dtype=dtype)
    return out


def pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Choose the next token from ``logits (V,)``: argmax when ``temperature == 0``, else a tempered nucleus draw."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        drop = sorted_p.cumsum(0) - sorted_p >= top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def stream_tokens(model: GptOss, prompt: list[int], max_new: int, stop_ids: set[int], temperature: float = 0.0,
                  top_p: float = 1.0, seed: int | None = None, adapter: str | None = None,
                  lock: contextlib.AbstractContextManager | None = None,
                  cuda_graph: bool | None = None) -> Iterator[int]:
    """Yield up to ``max_new`` generated ids; a stop id is yielded and ends the stream.

    ``lock`` (held around each forward step) lets streams of several threads share one model, interleaved.
    ``cuda_graph`` (default: on CUDA, for a ``max_new`` between ``GRAPH_MIN_TOKENS`` and ``GRAPH_MAX_TOKENS``)
    replays the decode step as one CUDA graph instead of launching its ~2,000 kernels from Python one by one; its
    KV cache is sized for ``max_new`` up front (a graph needs fixed shapes), hence the upper bound.
    """
    lock = lock or contextlib.nullcontext()
    device = model.embed.device
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and GRAPH_MIN_TOKENS <= max_new <= GRAPH_MAX_TOKENS
    generator = None
    if temperature > 0:
        generator = torch.Generator()
        generator.manual_seed(seed if seed is not None else torch.seed())
    cache = model.new_cache(1, len(prompt) + (max_new if cuda_graph else min(max_new, FIRST_RESERVE)))
    ids = torch.tensor([prompt], device=device)
    with lock:
        logits = model.logits(model(ids, cache=cache, adapter=adapter)[:, -1], adapter)[0]   # (V,)
    step_fn = _GraphStep(model, cache, adapter) if cuda_graph else None
    for step in range(max_new):
        with lock:   # all of a stream's device work under the lock, so none overlaps another's graph capture
            token = pick(logits, temperature, top_p, generator)
        yield token
        if token in stop_ids or step == max_new - 1:
            return
        with lock:
            if step_fn is not None:
                logits = step_fn(token)
            else:
                hidden = model(torch.tensor([[token]], device=device), cache=cache, adapter=adapter)
                logits = model.logits(hidden[:, -1], adapter)[0]


class _GraphStep:
    """One decode step (token id → next-token logits) captured as a CUDA graph on a fixed KV cache.

    The first call runs eagerly (it also compiles and warms every kernel), the second captures, and every later
    call copies the token into the graph's input and replays it; the cache advances on the device each time.
    """

    def __init__(self, model: GptOss, cache, adapter: str | None):
        self.model, self.cache, self.adapter = model, cache, adapter
        cache.fix()
        self.ids = torch.zeros((1, 1), dtype=torch.long, device=model.embed.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.calls = 0

    def _run(self) -> torch.Tensor:
        hidden = self.model(self.ids, cache=self.cache, adapter=self.adapter)
        return self.model.logits(hidden[:, -1], self.adapter)[0]

    def __call__(self, token: int) -> torch.Tensor:
        self.ids.fill_(token)
        self.calls += 1
        if self.calls == 1:
            return self._run()
        if self.graph is None:
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            # recorded, not run (the cache does not advance here); other threads' CUDA calls stay legal meanwhile
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.logits = self._run()
            self.cache.columns -= 1               # Python-side bookkeeping ran once during capture
        self.graph.replay()
        return self.logits


@torch.inference_mode()
def greedy_batch(model: GptOss, prompts: list[list[int]], max_new: int, stop_ids: set[int],
                 adapter: str | None = None, on_step=None) -> list[list[int]]:
    """Greedy completions of ``prompts`` decoded together; each stops at its first stop id (which it keeps).
    ``on_step()`` is called after each token step (for a progress bar)."""
    device = model.embed.device
    # left padding: every row's last prompt token in the same column
    ids = pad_rows(prompts, PAD_ID, left=True).to(device)
    mask = pad_rows([[1] * len(p) for p in prompts], 0, left=True).to(device)
    width = ids.shape[1]
    cache = model.new_cache(len(prompts), width + min(max_new, FIRST_RESERVE))
    logits = model.logits(model(ids, mask, cache, adapter)[:, -1], adapter)               # (B, V)
    out: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    stops = torch.tensor(sorted(stop_ids), device=device)
    for step in range(max_new):
        nxt = torch.argmax(logits, dim=-1)                                                 # (B,)
        for i in torch.nonzero(~done).flatten().tolist():
            out[i].append(int(nxt[i]))
        if on_step is not None:
            on_step()
        done |= torch.isin(nxt, stops)
        if bool(done.all()) or step == max_new - 1:
            break
        step_mask = (~done).long()[:, None]   # finished rows feed padding: they no longer change anything
        hidden = model(torch.where(done, PAD_ID, nxt)[:, None], step_mask, cache, adapter)
        logits = model.logits(hidden[:, -1], adapter)
    return out
