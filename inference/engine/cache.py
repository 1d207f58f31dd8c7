"""KV memory for continuous batching: many sequences in one set of buffers, each taking only what it needs.

Full-attention layers keep keys and values in a pool of pages of :data:`PAGE` tokens, shared by all sequences; a
page table maps each slot's token positions to pages (page 0 is the *null page*: every unused table entry points at
it, and padding writes land in it with position -1, so its positions stay -1 and it is never attended).
Sliding-window layers keep a ring of ``window`` columns per slot (plus one scratch column for writes that a later
token of the same chunk supersedes), since older keys can never be attended again.

Every stored column records its token's position (-1: empty) and attention masks are built from positions, so
column order never matters (see :class:`inference.model.runtime.Attention`). A forward over some slots uses
:meth:`SlotCache.rows`, which speaks the cache protocol of :meth:`inference.model.runtime.GptOss.forward`
(``prepare/start/update/advance``). Decode steps cover slots ``[0, n)`` (the scheduler keeps live sequences
contiguous), so their sliding rings are read as views, without a copy.

Shapes: pool ``(pages + 1, kvh, PAGE, D)``, ring ``(slots, kvh, window + 1, D)``, table ``(slots, max_pages)``.
"""

from __future__ import annotations

import math

import torch

PAGE = 64   # tokens per page: a sequence wastes at most PAGE - 1 columns per full-attention layer


def page_bytes(model) -> int:
    """Bytes one page holds across all full-attention layers (keys, values and positions)."""
    cfg = model.cfg
    full = sum(1 for layer in model.layers if not layer.window)
    per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * model.embed.element_size() + 8
    return full * PAGE * per_token


def slot_bytes(model) -> int:
    """Bytes one slot's sliding-window rings hold."""
    cfg = model.cfg
    per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * model.embed.element_size() + 8
    return sum((layer.window + 1) * per_token for layer in model.layers if layer.window)


class SlotCache:
    """Keys and values of up to ``slots`` sequences of up to ``max_len`` tokens each, in ``pages`` shared pages."""

    def __init__(self, model, slots: int, pages: int, max_len: int):
        cfg = model.cfg
        kvh, D = cfg.num_key_value_heads, cfg.head_dim
        device, dtype = model.embed.device, model.embed.dtype
        self.slots, self.pages, self.max_len = slots, pages, max_len
        self.windows = [layer.window for layer in model.layers]
        self.max_pages = math.ceil(max_len / PAGE)
        self.k, self.v, self.pos = [], [], []
        for window in self.windows:
            shape = (slots, kvh, window + 1, D) if window else (pages + 1, kvh, PAGE, D)
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))
            self.pos.append(torch.full(shape[:1] + shape[2:3], -1, dtype=torch.long, device=device))
        self.table = torch.zeros(slots, self.max_pages, dtype=torch.long, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)   # tokens held per slot
        self.free = list(range(pages, 0, -1))                                 # pop() gives the lowest page
        self.owned: list[list[int]] = [[] for _ in range(slots)]

    @property
    def free_pages(self) -> int:
        return len(self.free)

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / PAGE)

    def allocate(self, slot: int, tokens: int) -> None:
        """Give an empty ``slot`` the pages for ``tokens`` tokens (the caller checked they are free)."""
        need = self.pages_for(tokens)
        pages = [self.free.pop() for _ in range(need)]
        self.owned[slot] = pages
        index = torch.tensor(pages, dtype=torch.long, device=self.table.device)
        self.table[slot, :need] = index
        for window, pos in zip(self.windows, self.pos):
            if not window:
                pos[index] = -1            # a reused page must not show its last owner's positions

    def release(self, slot: int) -> None:
        """Empty ``slot``: its pages go back to the pool, its rings and length are cleared."""
        self.free.extend(reversed(self.owned[slot]))
        self.owned[slot] = []
        self._clear(slot)

    def move(self, src: int, dst: int) -> None:
        """Move the sequence in ``src`` to the empty slot ``dst`` (pages stay where they are; rings are copied)."""
        self.table[dst] = self.table[src]
        self.lengths[dst] = self.lengths[src]
        for window, k, v, pos in zip(self.windows, self.k, self.v, self.pos):
            if window:
                k[dst], v[dst], pos[dst] = k[src], v[src], pos[src]
        self.owned[dst], self.owned[src] = self.owned[src], []
        self._clear(src)

    def _clear(self, slot: int) -> None:
        self.table[slot] = 0
        self.lengths[slot] = 0
        for window, pos in zip(self.windows, self.pos):
            if window:
                pos[slot] = -1

    def empty(self) -> bool:
        """No sequence holds anything (every page free, every length zero)."""
        return len(self.free) == self.pages and not bool(self.lengths.any())

    def rows(self, slots: torch.Tensor | range, pages: int) -> "Rows":
        """A forward's view of ``slots`` (a range ``[0, n)`` for decode steps: read as views; else an index tensor),
        attending over the first ``pages`` pages of each slot's table."""
        return Rows(self, slots, pages)


class Rows:
    """The cache protocol of :meth:`inference.model.runtime.GptOss.forward` over some slots of a :class:`SlotCache`."""

    def __init__(self, cache: SlotCache, slots, pages: int):
        self.cache, self.pages = cache, pages
        device = cache.table.device
        if isinstance(slots, range):
            assert slots.step == 1
            self.span = slice(slots.start, slots.stop)
            self.index = torch.arange(slots.start, slots.stop, device=device)
        else:
            self.span, self.index = None, slots.to(device)

    def _sel(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.span] if self.span is not None else t[self.index]

    def prepare(self, new_columns: int) -> None:
        pass   # pages were reserved when the sequence was admitted

    def start(self) -> torch.Tensor:
        return self._sel(self.cache.lengths)[:, None]

    def advance(self, new_columns: int, mask: torch.Tensor) -> None:
        added = mask.sum(1).to(self.cache.lengths.dtype)
        if self.span is not None:
            self.cache.lengths[self.span] += added
        else:
            self.cache.lengths.index_add_(0, self.index, added)

    def update(self, layer: int, k, v, qpos):
        """Store the new keys, return what layer ``layer`` attends over: ``k``/``v (B, kvh, T, D)``,
        ``qpos (B, T)`` (-1: padding) -> ``keys, values (B, kvh, S, D), kpos (B, S)``."""
        window = self.cache.windows[layer]
        if window:
            return self._ring(layer, window, k, v, qpos)
        return self._paged(layer, k, v, qpos)

    def _paged(self, layer: int, k, v, qpos):
        pool_k, pool_v, pool_p = self.cache.k[layer], self.cache.v[layer], self.cache.pos[layer]
        table = self._sel(self.cache.table)[:, :self.pages]                       # (B, P)
        real = qpos >= 0
        where = torch.where(real, qpos, 0)
        page = torch.where(real, table.gather(1, (where // PAGE).clamp(max=self.pages - 1)), 0)   # (B, T)
        offset = torch.where(real, where % PAGE, 0)
        # every column is kept, so write first and attend over the pages (the new keys included)
        pool_k[page, :, offset] = k.transpose(1, 2)                              # (B, T, kvh, D)
        pool_v[page, :, offset] = v.transpose(1, 2)
        pool_p[page, offset] = torch.where(real, qpos, -1)
        B, P = table.shape
        kvh, D = k.shape[1], k.shape[3]
        keys = pool_k[table].transpose(1, 2).reshape(B, kvh, P * PAGE, D)
        values = pool_v[table].transpose(1, 2).reshape(B, kvh, P * PAGE, D)
        return keys, values, pool_p[table].reshape(B, P * PAGE)

    def _ring(self, layer: int, window: int, k, v, qpos):
        ring_k, ring_v, ring_p = self.cache.k[layer], self.cache.v[layer], self.cache.pos[layer]
        rows = self.index[:, None]                                                 # (B, 1)
        T = k.shape[2]
        if T == 1:
            # decode: write first, then attend over the ring (a full ring holds exactly the window)
            col = torch.where(qpos >= 0, qpos % window, window)                    # (B, 1); padding -> scratch
            ring_k[rows, :, col] = k.transpose(1, 2)
            ring_v[rows, :, col] = v.transpose(1, 2)
            ring_p[rows, col] = qpos
            return (self._sel(ring_k)[:, :, :window], self._sel(ring_v)[:, :, :window],
                    self._sel(ring_p)[:, :window])
        # a chunk: attend over the ring as it was plus the chunk itself, then keep each row's last `window` tokens
        keys = torch.cat([self._sel(ring_k)[:, :, :window], k], dim=2)
        values = torch.cat([self._sel(ring_v)[:, :, :window], v], dim=2)
        kpos = torch.cat([self._sel(ring_p)[:, :window], qpos], dim=1)
        last = qpos.max(dim=1, keepdim=True).values                                # (B, 1)
        keep = (qpos >= 0) & (qpos > last - window)
        col = torch.where(keep, qpos % window, window)                             # superseded -> scratch
        ring_k[rows, :, col] = k.transpose(1, 2)
        ring_v[rows, :, col] = v.transpose(1, 2)
        ring_p[rows, col] = torch.where(keep, qpos, -1)
        return keys, values, kpos
