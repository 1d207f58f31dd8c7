"""Packing (``data.packing``): short training sequences put one after another into rows of ``data.max_length`` tokens.

Which sequences share a row is decided here, best-fit decreasing (as TRL's ``bfd`` strategy): the longest sequence
first, each into the row with the least room that still fits it, a new row only when none does. It is deterministic
and runs in O(n log n) for n sequences. The row keeps every sequence's own length, and the
training batch turns those lengths into what keeps the sequences apart in the model (``finetune.train.trainer``:
positions that restart at 0 per sequence and the offsets attention needs, so no token sees another sequence).

Predicting a sequence's first token from the one before it would cross a boundary, so each sequence's first weight is
0 in the row (unpacked, position 0 is never predicted either). The loss of a packed row is then the sum of its
sequences' own losses.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass
class PackedRow:
    """One row: the concatenated ``ids``, ``weights`` and ``targets`` of its sequences, and their ``lengths``."""

    ids: list[int]
    weights: list[float]
    targets: list[int]
    lengths: list[int]


def plan(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of the sequences in each row, best-fit decreasing: the longest sequence first, each into the row whose
    room fits it most tightly (a new row when none has room); every row's total is at most ``capacity``."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []          # (room left, row), sorted: the tightest fit is a bisection away
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sequence {i} has {n} tokens, more than a row's {capacity}")
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, r = free.pop(at)
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - n:
            bisect.insort(free, (room - n, r))
    return rows


def pack(examples, capacity: int) -> list[PackedRow]:
    """``examples`` (each with ``ids``, ``weights``, ``targets``) packed into rows of at most ``capacity`` tokens."""
    out = []
    for members in plan([len(e.ids) for e in examples], capacity):
        row = PackedRow([], [], [], [])
        for i in members:
            e = examples[i]
            row.ids += e.ids
            row.weights += [0.0] + list(e.weights[1:])      # never predicted across the boundary
            row.targets += e.targets
            row.lengths.append(len(e.ids))
        out.append(row)
    return out
