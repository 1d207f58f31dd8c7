"""Teacher-forced logits of a gpt-oss checkpoint that need not fit in memory: one decoder layer at a time.

:func:`logits` runs sequences through the checkpoint on disk the way :class:`inference.model.runtime.GptOss` does, but
holds one layer's weights at a time: the embedding is read, used and dropped; then for each layer its tensors are
read from the safetensors files, every sequence's hidden states ``(1, T, H)`` pass through it, and it is dropped;
then the final norm and the head. Device memory holds one layer (gpt-oss-20b: 1.6 GB in bf16 with dense experts,
0.4 GB packed) plus the hidden states, so a merged bf16 gpt-oss-20b (39 GB) is checked on a 24 GB card, or a 20b on
a CPU-only machine in bounded host memory. Several adapters (and the base, ``None``) are computed in the same pass.

:func:`layers` is the same pass teacher-forced: every entry runs each layer on one given input (a reference's hidden
states) and each layer's output is kept, per sequence ``(T, H)``, so two models are compared layer by layer without
one layer's error feeding the next (what :mod:`finetune.ship.parity`'s layer-wise checks need at real size, where a
free-running comparison is chaotic).

Each layer is :class:`inference.model.runtime.Layer` itself, and sequences run in the padded batches of :func:`batches`,
as :func:`model_logits` runs them through a model loaded whole: the two give the same logits, operation for operation
(tests/test_ship_scale.py checks they are equal). Batching matters on a GPU: a prefill decodes each routed expert
once per batch and layer, not once per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from inference.model.checkpoint import TensorFiles, read_config

# Padded tokens per batch: attention scores are (B, heads, 1024, S) at most, so B * S stays bounded.
TOKENS_PER_BATCH = 2048


def batches(lengths: list[int], budget: int = TOKENS_PER_BATCH) -> list[list[int]]:
    """Indices of sequences grouped into batches: sorted by length (little padding), each at most ``budget`` padded
    tokens (a longer sequence runs alone)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        if groups and (len(groups[-1]) + 1) * lengths[i] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def padded(sequences: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids (B, T)`` right-padded and ``attention_mask (B, T)`` (0 = padding): real tokens keep positions 0..T-1."""
    from inference.engine.batch import PAD_ID, pad_rows
    return pad_rows(sequences, PAD_ID).to(device), pad_rows([[1] * len(s) for s in sequences], 0).to(device)


def _rows(hidden: torch.Tensor, group: list[int], sequences: list[list[int]], last_only: bool):
    """Each sequence's real positions of a batch's hidden states ``(B, T, H)``: ``(1, n, H)``, or ``(1, 1, H)``."""
    for row, i in enumerate(group):
        n = len(sequences[i])
        yield i, hidden[row:row + 1, n - 1:n] if last_only else hidden[row:row + 1, :n]


def model_logits(model, sequences: list[list[int]], adapter: str | None = None) -> list[torch.Tensor]:
    """Logits ``(T, V)`` (float32, on the CPU) of each sequence from a model loaded whole
    (:class:`inference.model.runtime.GptOss`), in the batches of :func:`batches`: what :func:`logits` gives layer by
    layer."""
    out: list = [None] * len(sequences)
    with torch.no_grad():
        for group in batches([len(s) for s in sequences]):
            ids, mask = padded([sequences[i] for i in group], model.embed.device)
            hidden = model(ids, attention_mask=mask, adapter=adapter)                    # (B, T, H), normed
            for i, h in _rows(hidden, group, sequences, False):
                out[i] = model.logits(h, adapter)[0].float().cpu()
    return out


def logits(model_dir: str | Path, sequences: list[list[int]], adapters: dict[str | None, str | Path | None]
           | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
           progress: Callable[[int, int], None] | None = None, last_only: bool = False
           ) -> dict[str | None, list[torch.Tensor]]:
    """Logits ``(T, V)`` (float32, on the CPU) of each sequence, for each entry of ``adapters``: a name mapped to an
    adapter directory, or to ``None`` for the base alone (default: the base alone, under ``None``). With
    ``last_only``, the last position's alone, ``(1, V)`` (all a greedy step needs; V is 201,088 for gpt-oss).

    ``progress(done, total)`` is called after each of the ``num_hidden_layers + 2`` steps (embedding, layers, head).
    """
    return _run(model_dir, sequences, adapters, dtype, device, progress, last_only)


@dataclass
class Layers:
    """What :func:`layers` gives: per decoder layer, per sequence, ``(T, H)`` float32 tensors on the CPU (real
    positions only), and the logits ``(T, V)`` of the final norm and head on the last layer's output."""

    inputs: list[list[torch.Tensor]]                       # [layer][sequence]: the input every entry was fed
    outputs: dict[str | None, list[list[torch.Tensor]]]    # [name][layer][sequence]: each entry's layer output
    logits: dict[str | None, list[torch.Tensor]]           # [name][sequence]
    routing: list[list[torch.Tensor]] | None = None        # [layer][sequence]: (T, k) experts every entry was held to


def layers(model_dir: str | Path, sequences: list[list[int]], adapters: dict[str | None, str | Path | None]
           | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
           progress: Callable[[int, int], None] | None = None, *, follow: str | None = None,
           inputs: list[list[torch.Tensor]] | None = None, routing: list[list[torch.Tensor]] | None = None) -> Layers:
    """Teacher-forced layers: every layer of every entry of ``adapters`` (as in :func:`logits`) run on the same
    input, and its output kept. The input of layer ``l`` is either ``inputs[l]`` (per sequence ``(T, H)``, e.g. a
    reference's, from an earlier call) or, with ``follow``, that entry's own hidden states: it runs free (its
    outputs and logits are :func:`logits`'s, bit for bit) and the other entries run each layer on its input. Errors
    of one entry then never compound from layer to layer. ``logits``: final norm and head on the last layer's
    output, which saw the same input for every entry.

    Routing is held fixed the same way: with ``follow``, that entry's experts (each token's top-k) are recorded and
    every other entry's layer sends each token to them (its own router logits still weigh them), returned as
    ``routing``; with ``inputs``, ``routing`` (from such a call) does the same, or each entry routes itself when
    None. A top-k choice is discrete: a tiny difference can send a token to another expert, which changes that
    token's output wholly, and at gpt-oss-20b shapes with random weights an adapter's attention update alone moves
    about one position in ten across a top-4 boundary (the two-layer measurement in the README).

    Holds ``(layers + 1) * positions * H`` floats per entry on the CPU: gpt-oss-20b, 1,000 positions, 0.3 GB."""
    if (follow is None) == (inputs is None) or (follow is not None and follow not in (adapters or {None: None})):
        raise ValueError("layers(): give exactly one of follow (an entry of adapters) or inputs (per layer)")
    kept: list = []
    outputs: dict = {}

    def feed(index: int, hidden: dict, groups: list[list[int]]) -> dict:
        if follow is not None:
            given = hidden[follow]
            kept.append(_per_sequence(given, groups, sequences))
        else:
            given = [batched_inputs(inputs[index], group, sequences, dtype, device) for group in groups]
            kept.append([x.float().cpu() for x in inputs[index]])
        return {name: given for name in hidden}

    def record(index: int, hidden: dict, groups: list[list[int]]) -> None:
        for name, hs in hidden.items():
            outputs.setdefault(name, []).append(_per_sequence(hs, groups, sequences))

    cfg = read_config(Path(model_dir))
    if inputs is not None and len(inputs) != cfg.num_hidden_layers:
        raise ValueError(f"layers(): {len(inputs)} layers of inputs for {model_dir}")
    if routing is not None and (inputs is None or len(routing) != len(inputs)):
        raise ValueError("layers(): routing goes with inputs, one entry per layer")
    k = cfg.num_experts_per_tok
    groups = batches([len(s) for s in sequences])
    chosen: dict[tuple[int, int], torch.Tensor] = {}       # (layer, batch) -> (B*T, k): the followed entry's

    def route(index: int, name, b: int):
        if follow is not None and name == follow:
            def record_choice(logits):
                chosen[index, b] = torch.topk(logits, k, dim=-1).indices
                return chosen[index, b]
            return record_choice
        if follow is not None:
            return lambda logits: chosen[index, b]
        if routing is None:
            return None
        fixed = batched_routing(routing[index], groups[b], sequences, device)
        return lambda logits: fixed

    if follow is not None:      # the followed entry runs first in each layer: the others are held to its choices
        given = {None: None} if adapters is None else adapters
        adapters = {follow: given[follow], **given}
    logits_ = _run(model_dir, sequences, adapters, dtype, device, progress, False, feed, record, route)
    if follow is not None:
        routing = [[None] * len(sequences) for _ in range(cfg.num_hidden_layers)]
        for (index, b), experts in chosen.items():
            group = groups[b]
            for i, rows in _rows(experts.view(len(group), -1, k), group, sequences, False):    # (1, T_i, k)
                routing[index][i] = rows[0].cpu()
    return Layers(kept, outputs, logits_, routing)


def batched_routing(rows: list[torch.Tensor], group: list[int], sequences: list[list[int]], device) -> torch.Tensor:
    """Per-sequence experts ``(T_i, k)`` of the sequences in ``group`` (one batch) → ``(B*T, k)`` as the batch's
    router sees its rows; padded positions get experts 0..k-1 (their outputs are dropped). Also what
    :mod:`finetune.ship.hf_streamed` holds transformers' router to (its one batch: every sequence)."""
    k = rows[group[0]].shape[-1]
    longest = max(len(sequences[i]) for i in group)
    out = torch.arange(k, device=device).repeat(len(group), longest, 1)                     # (B, T, k)
    for row, i in enumerate(group):
        if rows[i].shape != (len(sequences[i]), k):
            raise ValueError(f"sequence {i}: routing {tuple(rows[i].shape)} for {len(sequences[i])} tokens")
        out[row, :len(sequences[i])] = rows[i].to(device)
    return out.view(-1, k)


def _per_sequence(hidden: list[torch.Tensor], groups: list[list[int]], sequences: list[list[int]]
                  ) -> list[torch.Tensor]:
    """Per-batch hidden states ``(B, T, H)`` → each sequence's real positions ``(T_i, H)``, float32 on the CPU."""
    out: list = [None] * len(sequences)
    for group, h in zip(groups, hidden):
        for i, rows in _rows(h, group, sequences, False):
            out[i] = rows[0].float().cpu()
    return out


def batched_inputs(rows: list[torch.Tensor], group: list[int], sequences: list[list[int]], dtype, device
                   ) -> torch.Tensor:
    """Per-sequence hidden states ``(T_i, H)`` of the sequences in ``group`` (one batch) → ``(B, T, H)``,
    right-padded with zeros (padded positions are never attended to and are dropped from every output). Also what
    :mod:`finetune.ship.hf_streamed` feeds transformers' layers (its one batch: every sequence)."""
    longest = max(len(sequences[i]) for i in group)
    x = torch.zeros(len(group), longest, rows[group[0]].shape[-1], dtype=dtype, device=device)
    for row, i in enumerate(group):
        if rows[i].shape[0] != len(sequences[i]):
            raise ValueError(f"sequence {i}: {rows[i].shape[0]} input positions for {len(sequences[i])} tokens")
        x[row, :len(sequences[i])] = rows[i].to(device, dtype)
    return x


def _run(model_dir: str | Path, sequences: list[list[int]], adapters: dict | None, dtype: torch.dtype,
         device: str | torch.device, progress: Callable[[int, int], None] | None, last_only: bool,
         feed: Callable | None = None, record: Callable | None = None, route: Callable | None = None
         ) -> dict[str | None, list[torch.Tensor]]:
    """The layer-streamed forward behind :func:`logits` and :func:`layers`. Before layer ``i``,
    ``feed(i, hidden, groups)`` may replace every entry's per-batch hidden states ``(B, T, H)`` with others; after
    it, ``record(i, hidden, groups)`` sees its outputs (``groups``: the sequences of each batch). ``route(i, name,
    b)`` gives the layer's ``route`` (:class:`inference.model.runtime.Layer`) for entry ``name`` on batch ``b``; entries
    run in the order of ``adapters``."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    from inference.model.adapters import attach_layer, read_adapter
    from inference.model.runtime import Layer, Linear, RMSNorm, check_shapes, positions
    model_dir, device = Path(model_dir), torch.device(device)
    cfg = read_config(model_dir)
    adapters = {None: None} if adapters is None else dict(adapters)
    read = {name: read_adapter(path, cfg, dtype, device) for name, path in adapters.items() if path is not None}
    steps, done = cfg.num_hidden_layers + 2, 0

    def step():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, steps)

    def weight(files: TensorFiles, key: str) -> torch.Tensor:
        t = files[key].to(device)
        return t if t.dtype == torch.uint8 else t.to(dtype)      # MXFP4 codes stay packed, as in the runtime

    with torch.no_grad(), TensorFiles(model_dir) as files:
        check_shapes(model_dir, cfg, files.shapes)
        embed = weight(files, "model.embed_tokens.weight")                                   # (V, H)
        groups = batches([len(s) for s in sequences])
        ids, qpos = [], []                                                                   # (B, T) per batch
        for group in groups:
            x, mask = padded([sequences[i] for i in group], device)
            ids.append(x)
            qpos.append(positions(mask))                                       # as GptOss.forward, without a cache
        hidden = {name: [F.embedding(x, embed) for x in ids] for name in adapters}         # (B, T, H) per batch
        del embed
        with torch.device(device):
            rope = GptOssRotaryEmbedding(cfg)
        rotary = [rope(h, q.clamp(min=0)) for h, q in zip(hidden[next(iter(adapters))], qpos)]   # cos, sin (B, T, D/2)
        masks = {name: [{} for _ in ids] for name in adapters}   # per batch, shared by its layers as in GptOss
        step()
        for i in range(cfg.num_hidden_layers):
            prefix = f"model.layers.{i}."
            mine = {k.removeprefix(prefix): weight(files, k) for k in files.names() if k.startswith(prefix)}
            window = cfg.sliding_window if cfg.layer_types[i] == "sliding_attention" else None
            layer = Layer(mine, cfg, window, dtype)
            for name, adapter in read.items():
                attach_layer(layer, i, name, adapter)
            if feed is not None:
                hidden = feed(i, hidden, groups)
            for name in adapters:
                out = []
                for b, (h, (cos, sin), q, m) in enumerate(zip(hidden[name], rotary, qpos, masks[name])):
                    layer.route = route(i, name, b) if route is not None else None
                    out.append(layer(h, cos, sin, q, None, i, name if name in read else None, m))
                hidden[name] = out
            if record is not None:
                record(i, hidden, groups)
            del layer, mine
            step()
        norm = RMSNorm(weight(files, "model.norm.weight"), cfg.rms_norm_eps)
        head = Linear(weight(files, "lm_head.weight"),
                      weight(files, "lm_head.bias") if "lm_head.bias" in files else None)
        for name, adapter in read.items():
            if "lm_head" in adapter.linear:
                head.loras[name] = adapter.linear["lm_head"]
        out: dict = {}
        for name, hs in hidden.items():
            out[name] = [None] * len(sequences)
            for group, h in zip(groups, hs):
                for i, rows in _rows(norm(h), group, sequences, last_only):       # normed whole, as GptOss does
                    out[name][i] = head(rows, name if name in read else None).float()[0].cpu()
        step()
    return out
