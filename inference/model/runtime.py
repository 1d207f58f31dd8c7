"""The gpt-oss forward pass for inference, with MXFP4 experts kept packed and LoRA adapters beside the base.

This module owns the model: its weights as loaded from an HF-layout directory, the forward pass over a
:class:`KVCache`, and where adapter weights plug in. It mirrors transformers' eager ``GptOssForCausalLM`` operation
for operation (RMSNorm in fp32, YaRN rotary embedding, attention with per-head sinks and a sliding window on
alternate layers, top-k softmax routing, clamped SwiGLU experts with biases), which is its oracle in the tests.

Memory: expert weights stay as the checkpoint's MXFP4 ``*_blocks`` (uint8, 4 bits per weight) and ``*_scales``;
each forward decodes only the experts its tokens were routed to, one expert at a time, through
:func:`inference.model.mxfp4.unpack`. A checkpoint with dense experts (or an adapter merged into them) is held dense.

Shapes: ``B`` batch, ``T`` new tokens, ``S`` keys attended, ``H`` hidden, ``nh``/``kvh`` query/key-value heads,
``D`` head dim, ``E`` experts, ``I`` expert intermediate size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from inference.errors import UserError
from inference.model import compiled, kernels, mxfp4
from inference.model.moe import decode, down_epilogue, gate_up_epilogue, swiglu

QUERY_CHUNK = 1024   # attention scores are (B, nh, QUERY_CHUNK, S) at most, so long prompts don't need T*T memory


@dataclass
class Lora:
    """One adapter's low-rank update of one weight: ``delta = scale * B @ A``.

    Linear: ``A (r, in)``, ``B (out, r)``. Experts: ``A (E, r, in)``, ``B (E, r, out)`` (per expert).
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float


@dataclass(frozen=True)
class RowAdapters:
    """Which adapter each row of a batch uses: ``index (B,)`` (or ``(B, T)`` per token), 0 for the base and ``i``
    for ``names[i - 1]``. Passed as a forward's ``adapter``, it gives every sequence of one batch its own LoRA side
    path (the base weights are read once for all of them), as multi-LoRA servers do."""

    index: torch.Tensor
    names: tuple[str, ...]

    def per_token(self, T: int) -> "RowAdapters":
        if self.index.dim() == 2:
            return self
        return RowAdapters(self.index[:, None].expand(-1, T), self.names)

    def flat(self) -> torch.Tensor:
        return self.index.reshape(-1)

    @functools.cached_property
    def keep(self) -> torch.Tensor:
        """``(rows, len(names) + 1)`` bool one-hot of :meth:`flat`: built once per forward and shared by every
        projection that gives each row its own adapter (the experts' blocks depend on the routing: built per layer)."""
        return _one_hot(self.flat(), len(self.names) + 1)


def _one_hot(block: torch.Tensor, groups: int) -> torch.Tensor:
    """``(rows, groups)`` bool, True at ``block[i]``: by comparison, since F.one_hot checks its indices on the host,
    which a CUDA graph cannot capture."""
    return block[:, None] == torch.arange(groups, device=block.device)[None, :]


def _stack_rows(blocks: list[torch.Tensor | None], shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """``[base zeros, adapter 1, ...]`` stacked on a new first dimension; an adapter without this module is zeros and
    a smaller rank is zero-padded (zeros add exactly nothing)."""
    out = torch.zeros((len(blocks) + 1, *shape), dtype=like.dtype, device=like.device)
    for i, t in enumerate(blocks, start=1):
        if t is not None:
            out[(i, *(slice(0, n) for n in t.shape))] = t
    return out


def _lora_blocks(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, block: torch.Tensor,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
    """Row ``i``'s LoRA output ``(x_i A_g^T) B_g`` with ``g = block[i]``, for ``a (G, r, in)``, ``b (G, r, out)``:
    ``x`` times every block's A in one matmul, the other blocks zeroed by a one-hot mask, then times all the B's.
    No per-row weight copies (a gather of ``A_g`` per row would be ``rows * r * in`` values: 0.75 GB for a
    2,048-token gpt-oss-20b prefill) and no host synchronisation. ``keep``: :func:`_one_hot` of ``block`` when the
    caller has it already."""
    G, r, fin = a.shape
    low = (x @ a.reshape(-1, fin).T).view(x.shape[0], G, r)                          # (rows, G, r)
    keep = _one_hot(block, G) if keep is None else keep                               # (rows, G)
    return (low * keep[:, :, None]).reshape(x.shape[0], -1) @ b.reshape(-1, b.shape[-1])


class Linear(torch.nn.Module):
    """``y = x W^T + b`` plus, for the adapter chosen per call, ``scale * (x A^T) B^T`` (never merged unless asked).

    ``adapter`` is one adapter's name for the whole call, or :class:`RowAdapters` (one per row)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)   # (out, in)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.loras: dict[str, Lora] = {}
        self._stacks: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor] | None] = {}

    def forward(self, x: torch.Tensor, adapter=None) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if isinstance(adapter, RowAdapters):
            return self._rows(x, y, adapter)
        lora = self.loras.get(adapter) if adapter else None
        if lora is not None:
            y = y + F.linear(F.linear(x, lora.A), lora.B) * lora.scale
        return y

    def _stack(self, names: tuple[str, ...]):
        """``A (n+1, r, in)`` and ``scale * B (n+1, r, out)`` of adapters ``names`` (block 0: the base, zeros);
        None when none of them adapts this layer. Built once per set of names."""
        if names not in self._stacks:
            loras = [self.loras.get(n) for n in names]
            if not any(loras):
                self._stacks[names] = None
            else:
                r = max(lo.A.shape[0] for lo in loras if lo)
                out_f, in_f = self.weight.shape
                a = _stack_rows([lo.A if lo else None for lo in loras], (r, in_f), self.weight)
                b = _stack_rows([(lo.B * lo.scale).T if lo else None for lo in loras], (r, out_f), self.weight)
                self._stacks[names] = (a, b)
        return self._stacks[names]

    def _rows(self, x: torch.Tensor, y: torch.Tensor, rows: RowAdapters) -> torch.Tensor:
        """Each row's own LoRA (:func:`_lora_blocks` over the stacked adapters)."""
        stack = self._stack(rows.names)
        if stack is None:
            return y
        flat = x.reshape(-1, x.shape[-1])                                           # (N, in)
        return y + _lora_blocks(flat, *stack, rows.flat(), rows.keep).view_as(y)

    def effective_weight(self, adapter: str | None) -> torch.Tensor:
        """The weight this layer applies for ``adapter``, merged (for losses that take the weight itself)."""
        lora = self.loras.get(adapter) if adapter else None
        return self.weight if lora is None else self._merged(lora)

    def merge(self, lora: Lora) -> None:
        self.weight.data = self._merged(lora)

    def _merged(self, lora: Lora) -> torch.Tensor:
        return (self.weight.float() + (lora.B.float() @ lora.A.float()) * lora.scale).to(self.weight.dtype)


class Experts(torch.nn.Module):
    """The experts of one MoE layer: packed MXFP4 (decoded per routed expert) or dense, plus LoRA side paths.

    Packed: ``gate_up_blocks (E, 2I, H/32, 16)``, ``gate_up_scales (E, 2I, H/32)``, ``down_blocks (E, H, I/32, 16)``,
    ``down_scales (E, H, I/32)``: rows are output features, as on disk. Dense: ``gate_up (E, H, 2I)``,
    ``down (E, I, H)``, transformers' layout. Gate and up are interleaved in the 2I outputs (even = gate).
    """

    def __init__(self, tensors: dict[str, torch.Tensor], alpha: float, limit: float, dtype: torch.dtype):
        super().__init__()
        self.packed = "gate_up_blocks" in tensors
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.alpha, self.limit, self.dtype = alpha, limit, dtype
        self.loras: dict[str, dict[str, Lora]] = {}   # adapter -> {"gate_up": Lora, "down": Lora}
        self._stacks: dict[tuple[str, ...], dict] = {}
        self._fits: dict[str, bool] = {}              # proj -> kernels.scales_fit_bf16 of its scales

    def _weight(self, proj: str, e: int) -> tuple[torch.Tensor, bool]:
        """Expert ``e``'s weight for ``proj`` and whether it is ``(out, in)`` (packed) rather than ``(in, out)``."""
        if self.packed:
            blocks, scales = getattr(self, proj + "_blocks"), getattr(self, proj + "_scales")
            # on CUDA one Triton pass at memory speed (bit-identical to unpack: tests/gpu/test_qlora_cuda.py); on
            # the CPU unpack's table lookup is ~6x faster than moe.decode's elementwise twin
            if blocks.is_cuda:
                return decode(blocks[e:e + 1], scales[e:e + 1], self.dtype)[0], True
            return mxfp4.unpack(blocks[e], scales[e], self.dtype), True
        return getattr(self, proj)[e], False

    def _project(self, x: torch.Tensor, proj: str, e: int, lora) -> torch.Tensor:
        """Expert ``e``'s ``proj`` for its rows ``x (n, in)``; ``lora``: one adapter's ``{proj: Lora}``, or
        ``(stacks, index (n,))`` for per-row adapters."""
        w, out_in = self._weight(proj, e)
        y = (F.linear(x, w) if out_in else x @ w) + getattr(self, proj + "_bias")[e]
        if isinstance(lora, tuple):
            stacks, index = lora
            if proj in stacks:
                a, b = stacks[proj]                                                   # (n+1, E, r, in/out)
                y = y + _lora_blocks(x, a[:, e], b[:, e], index)
        elif lora and proj in lora:
            ab = lora[proj]
            y = y + (x @ ab.A[e].T) @ ab.B[e] * ab.scale
        return y

    def stacks(self, names: tuple[str, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per projection, ``A (n+1, E, r, in)`` and ``scale * B (n+1, E, r, out)`` of adapters ``names`` (index 0:
        the base, zeros); built once per set of names."""
        cache = self._stacks
        if names not in cache:
            out = {}
            for proj in ("gate_up", "down"):
                loras = [self.loras.get(n, {}).get(proj) for n in names]
                if any(loras):
                    E, r = self.num_experts, max(lo.A.shape[1] for lo in loras if lo)
                    in_f, out_f = next((lo.A.shape[2], lo.B.shape[2]) for lo in loras if lo)
                    like = next(lo.A for lo in loras if lo)
                    out[proj] = (_stack_rows([lo.A if lo else None for lo in loras], (E, r, in_f), like),
                                 _stack_rows([lo.B * lo.scale if lo else None for lo in loras], (E, r, out_f), like))
            cache[names] = out
        return cache[names]

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, adapter=None) -> torch.Tensor:
        """``x (N, H)`` routed to ``indices (N, k)`` with ``weights (N, k)`` → ``(N, H)``. ``adapter``: a name, or
        :class:`RowAdapters` with one index per token."""
        if isinstance(adapter, RowAdapters):
            lora = (self.stacks(adapter.names), adapter.flat())
        else:
            lora = self.loras.get(adapter) if adapter else None
        if indices.numel() <= self.num_experts or self._grouped(x, x.shape[0]):
            return self._forward_gathered(x, indices, weights, lora)
        out = torch.zeros_like(x)
        for e in torch.unique(indices).tolist():   # each routed expert decoded once, for all its tokens
            token, slot = torch.where(indices == e)                                   # (n,), (n,)
            part = lora if not isinstance(lora, tuple) else (lora[0], lora[1][token])
            gate_up = self._project(x[token], "gate_up", e, part)                     # (n, 2I)
            y = self._project(self._glu(gate_up), "down", e, part)                    # (n, H)
            out.index_add_(0, token, y * weights[token, slot, None])
        return out

    def _grouped(self, x: torch.Tensor, tokens: int) -> bool:
        """Whether a batch of tokens goes through :func:`kernels.mxfp4_grouped` (CUDA, packed, bf16/fp16): every
        routed expert's weights read once for all its tokens, with no host synchronisation, so a batched decode
        step can be captured as a CUDA graph and a prefill chunk needs no per-expert loop."""
        return (self.packed and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
                and 1 < tokens <= kernels.GROUPED_MAX_TOKENS and kernels.available())

    def _fast(self, proj: str) -> bool:
        """Whether ``proj``'s scales allow the kernels' fast decode (:func:`kernels.scales_fit_bf16`): read once, on
        the first eager forward (serving warms up eagerly before it captures CUDA graphs; a step captured before
        would keep the general decode, which decodes the same weights)."""
        fits = self._fits.get(proj)
        if fits is None:
            if torch.cuda.is_current_stream_capturing():
                return False
            fits = self._fits[proj] = kernels.scales_fit_bf16(getattr(self, proj + "_scales"))
        return fits

    @property
    def num_experts(self) -> int:
        return (self.gate_up_blocks if self.packed else self.gate_up).shape[0]

    def _glu(self, gate_up: torch.Tensor) -> torch.Tensor:
        return swiglu(gate_up, self.alpha, self.limit)

    def _forward_gathered(self, x, indices, weights, lora):
        """Decoding path: few tokens, so compute just the ``N*k`` routed (token, expert) pairs in one batch, with no
        per-expert loop and no host synchronisation."""
        n, k = indices.shape
        flat = indices.reshape(-1)                                                    # (n*k,)
        xs = x.repeat_interleave(k, dim=0)                                            # (n*k, H)
        if isinstance(lora, tuple):
            lora = (lora[0], lora[1].repeat_interleave(k))                            # each pair's adapter
        # the rows of each expert, found once for both projections of the grouped kernel
        rows = kernels.expert_rows(flat, self.num_experts, n) if self._grouped(x, n) else None
        # bias, LoRA, SwiGLU and the routing weight in one fused pass each on CUDA (moe's epilogues)
        h = gate_up_epilogue(*self._project_gathered(xs, "gate_up", flat, lora, n, rows), self.gate_up_bias, flat,
                             self.alpha, self.limit)                                  # (n*k, I)
        y = down_epilogue(*self._project_gathered(h, "down", flat, lora, n, rows), self.down_bias, flat,
                          weights.reshape(-1))                                        # (n*k, H)
        return y.view(n, k, -1).sum(dim=1)

    def _project_gathered(self, x, proj: str, flat, lora, tokens: int,
                          rows=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x W_e^T, LoRA or None)`` for each routed pair, bias not added (the caller's epilogue adds it);
        ``rows``: the grouped kernel's :func:`kernels.expert_rows` of ``flat``."""
        if self.packed:
            blocks, scales = getattr(self, proj + "_blocks"), getattr(self, proj + "_scales")
            if rows is not None:   # several tokens: each expert read once for all its pairs
                y = kernels.mxfp4_grouped(x, blocks, scales, flat, tokens, rows)                      # (n*k, out)
            elif x.is_cuda and kernels.available():   # decoded in registers (kernels.py)
                y = kernels.mxfp4_matvec(x, blocks, scales, flat, fast=self._fast(proj))
            else:                                      # decoded to memory, then bmm
                y = kernels.mxfp4_matvec_reference(x, blocks, scales, flat)
        else:
            y = torch.bmm(x[:, None, :], getattr(self, proj)[flat])[:, 0]            # (n*k, in, out)
        side = None
        if isinstance(lora, tuple):
            stacks, index = lora
            if proj in stacks:
                a, b = stacks[proj]                                                   # (n+1, E, r, in/out)
                side = _lora_blocks(x, a.flatten(0, 1), b.flatten(0, 1), index * a.shape[1] + flat)
        elif lora and proj in lora:
            ab = lora[proj]
            side = _lora_blocks(x, ab.A, ab.B * ab.scale, flat)
        return y, side

    def dense_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``gate_up (E, H, 2I)`` and ``down (E, I, H)`` in fp32 (all experts decoded; for merging and export)."""
        if not self.packed:
            return self.gate_up.float(), self.down.float()
        return tuple(mxfp4.unpack(getattr(self, p + "_blocks"), getattr(self, p + "_scales")).transpose(1, 2)
                     for p in ("gate_up", "down"))

    def merge(self, lora: dict[str, Lora]) -> None:
        """Add an adapter's update for good. Packed experts become dense (requantizing is an export decision)."""
        gate_up, down = self.dense_weights()
        for name, w in (("gate_up", gate_up), ("down", down)):
            if name in lora:
                ab = lora[name]
                w += torch.einsum("eri,ero->eio", ab.A.float(), ab.B.float()) * ab.scale
        for name in ("gate_up_blocks", "gate_up_scales", "down_blocks", "down_scales"):
            if hasattr(self, name):
                delattr(self, name)
        self.register_buffer("gate_up", gate_up.to(self.dtype))
        self.register_buffer("down", down.to(self.dtype))
        self.packed = False
        self._fits.clear()


class KVCache:
    """Keys and values of the tokens seen so far, per layer, for ``B`` rows generated together.

    Full-attention layers keep every column; sliding-window layers keep a ring of ``window`` columns, since older
    keys can never be attended again. Each slot records its token's position (``-1``: empty or padding), and
    attention masks are built from positions, so slot order never matters. ``capacity`` is a first reservation:
    the cache doubles when a forward needs more, so a long generation limit costs memory only when it is used.
    """

    def __init__(self, runtime: "GptOss", batch: int, capacity: int):
        cfg = runtime.cfg
        self._shape = (batch, cfg.num_key_value_heads, cfg.head_dim)
        self._device, self._dtype = runtime.embed.device, runtime.embed.dtype
        self.windows = [layer.window for layer in runtime.layers]
        self.capacity = 0
        self.columns = 0                                            # columns written so far (pads included)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=self._device)   # real tokens seen per row
        self.size = [0] * len(self.windows)
        self.k, self.v, self.pos = list(self.size), list(self.size), list(self.size)
        self.column: torch.Tensor | None = None   # set by fix(): the column counter on the device
        self.reserve(max(capacity, 1))

    def fix(self) -> None:
        """From now on, decode steps have fixed shapes (attend over whole buffers, masked by position) and count
        columns on the device, so that one step can be captured as a CUDA graph. The capacity no longer grows."""
        self.column = torch.tensor([self.columns], device=self._device)

    def reserve(self, columns: int) -> None:
        """Make room for ``columns`` columns in all (doubling, so appending one at a time stays linear)."""
        if columns <= self.capacity:
            return
        if self.column is not None:
            raise ValueError(f"a fixed KV cache holds {self.capacity} columns, {columns} needed")
        self.capacity = max(columns, 2 * self.capacity)
        B, kvh, D = self._shape
        for i, window in enumerate(self.windows):
            size = min(self.capacity, window) if window else self.capacity
            if size == self.size[i]:
                continue
            # A ring smaller than its window has not wrapped yet (columns <= size), so slots keep their columns.
            k = torch.zeros(B, kvh, size, D, dtype=self._dtype, device=self._device)
            v = torch.zeros_like(k)
            pos = torch.full((B, size), -1, dtype=torch.long, device=self._device)
            old = self.size[i]
            if old:
                k[:, :, :old], v[:, :, :old], pos[:, :old] = self.k[i], self.v[i], self.pos[i]
            self.k[i], self.v[i], self.pos[i], self.size[i] = k, v, pos, size

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.pos)

    # The cache protocol GptOss.forward speaks (inference.engine.cache.SlotCache speaks it too):
    # prepare(T) before a forward of T new columns, start() the rows' first new positions (B, 1),
    # update(layer, k, v, qpos) -> what that layer attends over, advance(T, mask) after the forward.

    def prepare(self, new_columns: int) -> None:
        self.reserve(self.columns + new_columns)

    def start(self) -> torch.Tensor:
        return self.next_pos[:, None]

    def advance(self, new_columns: int, mask: torch.Tensor) -> None:
        self.columns += new_columns
        self.next_pos += mask.sum(1)
        if self.column is not None:
            self.column += new_columns

    def update(self, layer: int, k, v, qpos):
        """Attend over cached + new keys, then store the new ones. ``k``/``v (B, kvh, T, D)``, ``qpos (B, T)`` ->
        ``keys, values (B, kvh, S, D), kpos (B, S)``."""
        T, size = k.shape[2], self.size[layer]
        ck, cv, cp = self.k[layer], self.v[layer], self.pos[layer]
        filled = min(self.columns, size)
        if T == 1 and self.column is not None:
            # fixed shapes, slot from a device counter: the step can be captured as a CUDA graph and replayed
            slot = self.column % size                                                # (1,)
            ck.index_copy_(2, slot, k)
            cv.index_copy_(2, slot, v)
            cp.index_copy_(1, slot, qpos)
            return ck, cv, cp
        if T == 1:
            # decode: write first, then attend over the buffer (a full ring then holds exactly the window)
            slot = self.columns % size
            ck[:, :, slot], cv[:, :, slot], cp[:, slot] = k[:, :, 0], v[:, :, 0], qpos[:, 0]
            n = min(self.columns + 1, size)
            return ck[:, :, :n], cv[:, :, :n], cp[:, :n]
        keys = torch.cat([ck[:, :, :filled], k], dim=2)
        values = torch.cat([cv[:, :, :filled], v], dim=2)
        kpos = torch.cat([cp[:, :filled], qpos], dim=1)
        keep = min(T, size)                                       # a ring only needs the last `size` new columns
        cols = torch.arange(self.columns + T - keep, self.columns + T, device=k.device)
        slots = cols % size
        ck.index_copy_(2, slots, k[:, :, -keep:])
        cv.index_copy_(2, slots, v[:, :, -keep:])
        cp.index_copy_(1, slots, qpos[:, -keep:])
        return keys, values, kpos


class Attention(torch.nn.Module):
    def __init__(self, t: dict[str, torch.Tensor], cfg, window: int | None):
        super().__init__()
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, p, Linear(t[p + ".weight"], t.get(p + ".bias")))
        self.sinks = torch.nn.Parameter(t["sinks"], requires_grad=False)   # (nh,)
        self.nh, self.kvh, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = window

    def forward(self, x, cos, sin, qpos, cache: KVCache | None, layer: int, adapter: str | None, masks: dict):
        """``x (B, T, H)``, ``cos/sin (B, T, D/2)``, ``qpos (B, T)`` positions (-1 for padding) → ``(B, T, H)``.

        ``masks`` is shared by the layers of one forward: layers of the same kind see the same key positions.
        """
        B, T, _ = x.shape
        q = self.q_proj(x, adapter).view(B, T, self.nh, self.d).transpose(1, 2)     # (B, nh, T, D)
        k = self.k_proj(x, adapter).view(B, T, self.kvh, self.d).transpose(1, 2)    # (B, kvh, T, D)
        v = self.v_proj(x, adapter).view(B, T, self.kvh, self.d).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        keys, values, kpos = k, v, qpos
        if cache is not None:
            keys, values, kpos = cache.update(layer, k, v, qpos)
        out = torch.cat([self._attend(q[:, :, i:i + QUERY_CHUNK], keys, values, self._blocked(
                             masks, i, qpos[:, i:i + QUERY_CHUNK], kpos)) for i in range(0, T, QUERY_CHUNK)],
                        dim=2)                                                      # (B, nh, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.nh * self.d), adapter)

    def _blocked(self, masks: dict, chunk: int, qpos, kpos) -> torch.Tensor:
        """``(B, 1, Tq, S)``: True where a query may not see a key (padding, future, outside the window)."""
        key = (self.window, chunk)
        if key not in masks:
            allowed = (kpos[:, None, :] >= 0) & (kpos[:, None, :] <= qpos[:, :, None])  # (B, Tq, S)
            if self.window:
                allowed &= qpos[:, :, None] - kpos[:, None, :] < self.window
            masks[key] = ~allowed[:, None]
        return masks[key]

    def _attend(self, q, keys, values, blocked):
        """``q (B, nh, Tq, D)`` over ``keys``/``values (B, kvh, S, D)``: each key-value head serves ``nh / kvh``
        query heads (head ``h`` reads ``h // rep``), computed by grouping the queries instead of copying keys."""
        B, _, Tq, D = q.shape
        S = keys.shape[2]
        grouped = q.reshape(B, self.kvh, -1, D)                                     # (B, kvh, rep*Tq, D)
        scores = (grouped @ keys.transpose(2, 3)).view(B, self.nh, Tq, S)
        probs = _sink_softmax(scores, blocked, self.sinks, self.d ** -0.5)                   # (B, nh, Tq, S)
        out = probs.to(values.dtype).reshape(B, self.kvh, -1, S) @ values           # (B, kvh, rep*Tq, D)
        return out.view(B, self.nh, Tq, D)


@compiled.fused
def _sink_softmax(scores: torch.Tensor, blocked: torch.Tensor, sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention probabilities ``(B, nh, Tq, S)`` from raw ``scores`` with ``blocked (B, 1, Tq, S)`` keys masked
    and each head's sink in the softmax (one fused pass on CUDA: a decode step runs this per layer)."""
    B, _, Tq, _ = scores.shape
    scores = (scores * scale).masked_fill(blocked, float("-inf"))
    sinks = sinks.reshape(1, -1, 1, 1).expand(B, -1, Tq, 1).to(scores.dtype)
    combined = torch.cat([scores, sinks], dim=-1)       # the sink takes probability mass but has no value
    combined = combined - combined.max(dim=-1, keepdim=True).values
    return F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]




@compiled.fused
def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on halves (not interleaved pairs), as gpt-oss does. ``x (B, h, T, D)``, ``cos (B, T, D/2)``."""
    cos, sin = cos[:, None], sin[:, None]
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


class RMSNorm(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x):
        return _rms_norm(x, self.weight, self.eps)


@compiled.fused
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """gpt-oss's RMSNorm in fp32, back in ``x``'s dtype (one fused pass on CUDA)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h).to(x.dtype)


class Layer(torch.nn.Module):
    def __init__(self, t: dict[str, torch.Tensor], cfg, window: int | None, dtype: torch.dtype):
        super().__init__()
        self.window = window
        self.input_norm = RMSNorm(t["input_layernorm.weight"], cfg.rms_norm_eps)
        self.post_norm = RMSNorm(t["post_attention_layernorm.weight"], cfg.rms_norm_eps)
        self.attn = Attention({k.removeprefix("self_attn."): v for k, v in t.items() if k.startswith("self_attn.")},
                              cfg, window)
        self.router = Linear(t["mlp.router.weight"], t["mlp.router.bias"])
        self.top_k = cfg.num_experts_per_tok
        experts = {k.removeprefix("mlp.experts.").replace("_proj", ""): v for k, v in t.items()
                   if k.startswith("mlp.experts.")}
        self.experts = Experts(experts, getattr(cfg, "swiglu_alpha", 1.702), cfg.swiglu_limit, dtype)
        # None: each token's top-k experts, as gpt-oss routes. Else a function of the router logits (B*T, E) giving
        # the experts (B*T, k): inference.model.streamed.layers records one model's choices with it and holds
        # another model to them, so a comparison of two models' layers sees their weights, not a flipped top-k.
        self.route = None

    def forward(self, x, cos, sin, qpos, cache, index, adapter, masks):
        x = x + self.attn(self.input_norm(x), cos, sin, qpos, cache, index, adapter, masks)
        h = self.post_norm(x)
        flat = h.reshape(-1, h.shape[-1])                                   # (B*T, H)
        logits = self.router(flat, adapter)                                 # (B*T, E)
        if self.route is None:
            top, indices = torch.topk(logits, self.top_k, dim=-1)          # (B*T, k)
        else:
            indices = self.route(logits)
            top = logits.gather(1, indices)
        weights = F.softmax(top, dim=1, dtype=top.dtype)
        return x + self.experts(flat, indices, weights, adapter).view_as(h)


class GptOss(torch.nn.Module):
    """A loaded gpt-oss: :meth:`forward` gives final hidden states, :meth:`logits` the next-token scores."""

    def __init__(self, cfg, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: str | torch.device):
        super().__init__()
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding
        self.cfg, self.dtype = cfg, dtype
        self.embed = torch.nn.Parameter(tensors.pop("model.embed_tokens.weight"), requires_grad=False)  # (V, H)
        self.norm = RMSNorm(tensors.pop("model.norm.weight"), cfg.rms_norm_eps)
        self.lm_head = Linear(tensors.pop("lm_head.weight"), tensors.pop("lm_head.bias", None))
        layers = []
        for i in range(cfg.num_hidden_layers):
            prefix = f"model.layers.{i}."
            mine = {k.removeprefix(prefix): tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
            window = cfg.sliding_window if cfg.layer_types[i] == "sliding_attention" else None
            layers.append(Layer(mine, cfg, window, dtype))
        self.layers = torch.nn.ModuleList(layers)
        with torch.device(device):
            self.rope = GptOssRotaryEmbedding(cfg)     # YaRN frequencies and scaling, exactly transformers' own
        self.adapters: list[str] = []

    @property
    def context_length(self) -> int:
        return int(self.cfg.max_position_embeddings)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self, batch, capacity)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, adapter: str | None = None) -> torch.Tensor:
        """``input_ids (B, T)`` (with ``attention_mask (B, T)``, 0 = padding) → final hidden states ``(B, T, H)``.

        With a ``cache``, the tokens continue what it holds; without, they are a whole sequence.
        """
        if isinstance(adapter, RowAdapters):
            unknown = sorted(set(adapter.names) - set(self.adapters))
            if unknown:
                raise UserError(f"no adapter named {unknown[0]!r} is loaded")
            adapter = adapter.per_token(input_ids.shape[1])
        elif adapter is not None and adapter not in self.adapters:
            raise UserError(f"no adapter named {adapter!r} is loaded (loaded: {', '.join(self.adapters) or 'none'})")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
        start = 0
        if cache is not None:
            cache.prepare(input_ids.shape[1])
            start = cache.start()                                                    # (B, 1)
        qpos = positions(mask, start)                                                # (B, T)
        x = F.embedding(input_ids, self.embed)
        cos, sin = self.rope(x, qpos.clamp(min=0))                                   # (B, T, D/2) each
        masks: dict = {}
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, qpos, cache, i, adapter, masks)
        if cache is not None:
            cache.advance(input_ids.shape[1], mask)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor, adapter: str | None = None) -> torch.Tensor:
        return self.lm_head(hidden, adapter).float()

    def nbytes(self) -> int:
        """Bytes held by weights (packed experts count at their packed size)."""
        return sum(t.numel() * t.element_size() for t in list(self.parameters()) + list(self.buffers()))


def positions(mask: torch.Tensor, start: torch.Tensor | int = 0) -> torch.Tensor:
    """Each token's position ``(B, T)`` from ``attention_mask (B, T)``: real tokens count on from ``start`` (what a
    cache already holds), padding gets -1 (never attended)."""
    return torch.where(mask.bool(), start + mask.cumsum(1) - 1, -1)


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes for a gpt-oss config, experts as MXFP4 blocks/scales."""
    H, I, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    nh, kvh, D, V = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                   p + "self_attn.q_proj.weight": (nh * D, H), p + "self_attn.q_proj.bias": (nh * D,),
                   p + "self_attn.k_proj.weight": (kvh * D, H), p + "self_attn.k_proj.bias": (kvh * D,),
                   p + "self_attn.v_proj.weight": (kvh * D, H), p + "self_attn.v_proj.bias": (kvh * D,),
                   p + "self_attn.o_proj.weight": (H, nh * D), p + "self_attn.o_proj.bias": (H,),
                   p + "self_attn.sinks": (nh,), p + "mlp.router.weight": (E, H), p + "mlp.router.bias": (E,),
                   p + "mlp.experts.gate_up_proj_blocks": (E, 2 * I, H // 32, 16),
                   p + "mlp.experts.gate_up_proj_scales": (E, 2 * I, H // 32),
                   p + "mlp.experts.gate_up_proj_bias": (E, 2 * I),
                   p + "mlp.experts.down_proj_blocks": (E, H, I // 32, 16),
                   p + "mlp.experts.down_proj_scales": (E, H, I // 32),
                   p + "mlp.experts.down_proj_bias": (E, H)}
    return shapes


def _dense_expert_shapes(cfg, key: str) -> tuple[int, ...] | None:
    H, I, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    if key.endswith("mlp.experts.gate_up_proj"):
        return (E, H, 2 * I)
    if key.endswith("mlp.experts.down_proj"):
        return (E, I, H)
    return None


def read_tensors(model_dir: Path, cfg, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, checked against the config; MXFP4 stays uint8, everything else becomes ``dtype``."""
    from safetensors import safe_open

    from inference.model.checkpoint import safetensors_files
    shapes: dict[str, tuple[int, ...]] = {}
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            shapes |= {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    check_shapes(model_dir, cfg, shapes)
    from tqdm.auto import tqdm
    tensors: dict[str, torch.Tensor] = {}
    # a bar only when loading takes a while (a gpt-oss-20b: ~15 s from disk)
    with tqdm(total=len(shapes), desc=f"loading {model_dir.name}", unit="tensor", delay=3.0, leave=False) as bar:
        for path in safetensors_files(model_dir):
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    tensors[key] = t if t.dtype == torch.uint8 else t.to(dtype)
                    bar.update(1)
    return tensors


def check_shapes(model_dir: Path, cfg, shapes: dict[str, tuple[int, ...]]) -> None:
    """A UserError unless the checkpoint's tensor ``shapes`` are exactly what config.json implies (experts packed or
    dense)."""
    expected = expected_shapes(cfg)
    problems = []
    for key, shape in shapes.items():
        want = expected.get(key) or _dense_expert_shapes(cfg, key)
        if want is None:
            problems.append(f"unexpected tensor {key}")
        elif shape != want:
            problems.append(f"{key} has shape {shape}, config.json implies {want}")
    for key in expected:
        dense = key.removesuffix("_blocks").removesuffix("_scales")
        if key not in shapes and dense not in shapes:
            problems.append(f"missing tensor {key}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{model_dir}: weights do not match config.json: {'; '.join(problems[:3])}{more}")


def load(model_dir: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> GptOss:
    """Load an HF-layout gpt-oss directory. Defaults: CUDA + bf16 when available, else CPU + fp32."""
    from inference.model.checkpoint import read_config
    model_dir = Path(model_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = read_config(model_dir)
    model = GptOss(cfg, read_tensors(model_dir, cfg, dtype, device), dtype, device)
    return model.eval()
