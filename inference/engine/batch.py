"""Batched forward steps over a :class:`~inference.engine.cache.SlotCache`: prefill chunks and decode steps.

A *prefill* runs the next chunk of the prompts of some slots as one right-padded batch and returns each row's
next-token logits. A *decode step* feeds one token to every slot ``[0, n)`` (rows without a token are padding: they
write nothing that is ever attended) and returns their logits. Every row carries its own adapter
(:class:`inference.model.runtime.RowAdapters`), so one step serves the base and any number of adapters.

On CUDA a decode step is replayed as a CUDA graph (one launch instead of thousands of Python-issued kernels),
captured once per (batch bucket, page bucket): batch sizes and attended pages round up to powers of two, padding rows
and unused pages being masked. The first step of a shape runs eagerly (compiling every kernel), the second captures
it; all graphs share one memory pool, since they never run at the same time.

Also here: :func:`pad_rows`, which stacks ragged rows for any batched forward.
"""

from __future__ import annotations

import torch

from inference.model.runtime import GptOss, RowAdapters

PAD_ID = 199999  # <|endoftext|>: never attended (masked), only fills ragged batches


def pad_rows(rows: list[list], value: float, left: bool = False, dtype=torch.long) -> torch.Tensor:
    """Stack ragged rows into ``(B, T_max)``, padding with ``value`` on the right (or the left)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        if r:
            if left:
                out[i, width - len(r):] = torch.tensor(r, dtype=dtype)
            else:
                out[i, :len(r)] = torch.tensor(r, dtype=dtype)
    return out


def bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class Stepper:
    """Runs prefills and decode steps of ``model`` over ``cache``; ``names`` are the adapters a row's index picks
    (index 0: the base, ``i``: ``names[i - 1]``)."""

    def __init__(self, model: GptOss, cache, names: tuple[str, ...], graphs: bool | None = None):
        self.model, self.cache, self.names = model, cache, names
        self.device = model.embed.device
        # graphs for the serving dtypes; float32 on CUDA (a checking configuration) decodes eagerly
        self.graphs_on = (self.device.type == "cuda" and model.dtype in (torch.bfloat16, torch.float16)
                          if graphs is None else graphs)
        self._graphs: dict[tuple[int, int, bool], _Graph] = {}
        self.pool = None

    def _names(self, adapters: list[int]) -> tuple[str, ...]:
        """The adapters a step's side paths stack: none when every row is the base, so a base-only step computes
        no LoRA at all (with adapters loaded, their stacks would otherwise be multiplied by zeros in every layer)."""
        return self.names if any(adapters) else ()

    @torch.inference_mode()
    def prefill(self, slots: list[int], chunks: list[list[int]], adapters: list[int], ends: list[int]) -> torch.Tensor:
        """Run ``chunks[i]`` (non-empty) into ``slots[i]``, which will then hold ``ends[i]`` tokens; returns each
        row's logits after its chunk's last token ``(B, V)``."""
        ids = pad_rows(chunks, PAD_ID).to(self.device)
        mask = pad_rows([[1] * len(c) for c in chunks], 0).to(self.device)
        rows = self.cache.rows(torch.tensor(slots), self.cache.pages_for(max(ends)))
        which = RowAdapters(torch.tensor(adapters, device=self.device), self._names(adapters))
        hidden = self.model(ids, mask, rows, which)                                   # (B, T, H)
        last = torch.tensor([len(c) - 1 for c in chunks], device=self.device)
        return self.model.logits(hidden[torch.arange(len(chunks), device=self.device), last], which)

    @torch.inference_mode()
    def decode(self, tokens: list[int | None], adapters: list[int], pages: int) -> torch.Tensor:
        """One token into each slot ``[0, len(tokens))`` (None: that row is padding this step); attending over
        ``pages`` pages at most. Returns ``(n, V)`` logits."""
        n = len(tokens)
        inputs = torch.tensor([[PAD_ID if t is None else t for t in tokens], [t is not None for t in tokens],
                               adapters], dtype=torch.long)                             # (3, n)
        names = self._names(adapters)
        if not self._graph_ok(n):
            return self._run(inputs.to(self.device), pages, names)
        b = min(bucket(n), self.cache.slots)
        p = min(bucket(pages), self.cache.max_pages)
        padded = torch.zeros(3, b, dtype=torch.long)
        padded[0] = PAD_ID
        padded[:, :n] = inputs
        graph = self._graphs.get((b, p, bool(names)))
        if graph is None:
            graph = self._graphs[(b, p, bool(names))] = _Graph(self, b, p, names)
        return graph(padded)[:n]

    def _graph_ok(self, n: int) -> bool:
        """A step can be a graph when no layer reads anything back to the host: few enough tokens for the gathered
        expert path, or the grouped MXFP4 kernel."""
        if not self.graphs_on:
            return False
        experts = self.model.layers[0].experts
        b = min(bucket(n), self.cache.slots)
        if b * self.model.layers[0].top_k <= experts.num_experts:
            return True
        probe = torch.empty(1, 1, dtype=self.model.dtype, device=self.device)
        return experts._grouped(probe, b)

    def _run(self, inputs: torch.Tensor, pages: int, names: tuple[str, ...]) -> torch.Tensor:
        """The decode step itself: ``inputs (3, b)`` = token ids, real-token mask, adapter index, on the device."""
        which = RowAdapters(inputs[2], names)
        rows = self.cache.rows(range(inputs.shape[1]), pages)
        hidden = self.model(inputs[0][:, None], inputs[1][:, None], rows, which)
        return self.model.logits(hidden[:, -1], which)

    @property
    def graph_count(self) -> int:
        return sum(g.graph is not None for g in self._graphs.values())


class _Graph:
    """One decode-step shape ``(b rows, p pages)`` with adapters ``names`` (all or none): eager the first time,
    captured the second, replayed after."""

    def __init__(self, stepper: Stepper, b: int, p: int, names: tuple[str, ...]):
        self.stepper, self.pages, self.names = stepper, p, names
        self.inputs = torch.zeros(3, b, dtype=torch.long, device=stepper.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        self.calls = 0

    def __call__(self, host_inputs: torch.Tensor) -> torch.Tensor:
        self.inputs.copy_(host_inputs)
        self.calls += 1
        if self.calls == 1:
            return self.stepper._run(self.inputs, self.pages, self.names)
        if self.graph is None:
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            # recorded, not run: the cache does not advance here, the replay below does it
            with torch.cuda.graph(graph, pool=self.stepper.pool, capture_error_mode="thread_local"):
                self.out = self.stepper._run(self.inputs, self.pages, self.names)
            self.stepper.pool = graph.pool()
            self.graph = graph
        self.graph.replay()
        return self.out
