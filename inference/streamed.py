"""Teacher-forced logits of a gpt-oss checkpoint that need not fit in memory: one decoder layer at a time.

:func:`logits` runs sequences through the checkpoint on disk the way :class:`inference.runtime.GptOss` does, but
holds one layer's weights at a time: the embedding is read, used and dropped; then for each layer its tensors are
read from the safetensors files, every sequence's hidden states ``(1, T, H)`` pass through it, and it is dropped;
then the final norm and the head. Device memory holds one layer (gpt-oss-20b: 1.6 GB in bf16 with dense experts,
0.4 GB packed) plus the hidden states, so a merged bf16 gpt-oss-20b (39 GB) is checked on a 24 GB card, or a 20b on
a CPU-only machine in bounded host memory. Several adapters (and the base, ``None``) are computed in the same pass.

Each layer is :class:`inference.runtime.Layer` itself and each sequence runs alone (batch 1), so the result is the
whole-model forward's, operation for operation (tests/test_streamed.py checks they are equal).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from inference.checkpoint import TensorFiles, read_config


def logits(model_dir: str | Path, sequences: list[list[int]], adapters: dict[str | None, str | Path | None]
           | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
           progress: Callable[[int, int], None] | None = None, last_only: bool = False
           ) -> dict[str | None, list[torch.Tensor]]:
    """Logits ``(T, V)`` (float32, on the CPU) of each sequence, for each entry of ``adapters``: a name mapped to an
    adapter directory, or to ``None`` for the base alone (default: the base alone, under ``None``). With
    ``last_only``, the last position's alone, ``(1, V)`` (all a greedy step needs; V is 201,088 for gpt-oss).

    ``progress(done, total)`` is called after each of the ``num_hidden_layers + 2`` steps (embedding, layers, head).
    """
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    from inference.adapters import attach_layer, read_adapter
    from inference.runtime import Layer, Linear, RMSNorm, check_shapes
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
        ids = [torch.tensor([s], device=device) for s in sequences]                        # (1, T) each
        hidden = {name: [F.embedding(x, embed) for x in ids] for name in adapters}         # (1, T, H) each
        del embed
        with torch.device(device):
            rope = GptOssRotaryEmbedding(cfg)
        qpos = [torch.arange(x.shape[1], device=device)[None] for x in ids]                # (1, T)
        rotary = [rope(h, q) for h, q in zip(hidden[next(iter(adapters))], qpos)]         # cos, sin (1, T, D/2)
        masks = {name: [{} for _ in ids] for name in adapters}   # per sequence, shared by its layers as in GptOss
        step()
        for i in range(cfg.num_hidden_layers):
            prefix = f"model.layers.{i}."
            mine = {k.removeprefix(prefix): weight(files, k) for k in files.names() if k.startswith(prefix)}
            window = cfg.sliding_window if cfg.layer_types[i] == "sliding_attention" else None
            layer = Layer(mine, cfg, window, dtype)
            for name, adapter in read.items():
                attach_layer(layer, i, name, adapter)
            for name in adapters:
                hidden[name] = [layer(h, cos, sin, q, None, i, name if name in read else None, m)
                                for h, (cos, sin), q, m in zip(hidden[name], rotary, qpos, masks[name])]
            del layer, mine
            step()
        norm = RMSNorm(weight(files, "model.norm.weight"), cfg.rms_norm_eps)
        head = Linear(weight(files, "lm_head.weight"),
                      weight(files, "lm_head.bias") if "lm_head.bias" in files else None)
        for name, adapter in read.items():
            if "lm_head" in adapter.linear:
                head.loras[name] = adapter.linear["lm_head"]
        out = {name: [head(norm(h[:, -1:] if last_only else h), name if name in read else None).float()[0].cpu()
                      for h in hs] for name, hs in hidden.items()}
        step()
    return out
