"""KV storage for the continuous-batching loop: decode slots that rows join and leave.

Every layer keeps keys and values in one buffer `[slots, H, C, D]` (C columns of capacity).
Live rows are packed in rows `0..n-1`; all of them append their next token in the same column
`end`, and row b's tokens fill the columns `[end - lens[b], end)` (right-aligned; the columns to
the left of a row are masked out). Attention runs over the window `[start, end)`, where `start`
is the left edge of the longest live row, as a view: no copy per step.

- join: a prefilled row's KV is copied into row n, right-aligned at `end` (one copy per layer);
- leave: the last live row is copied into the hole (one row's window), n shrinks by one;
- the window's left edge follows the longest live row, so a long row that leaves stops costing
  attention at once;
- a new row longer than `end` or a full buffer relays the window out: moved within the same
  buffers when they have room (every few hundred steps, as `end` walks to the right), into new
  ones, twice the columns needed, only when they do not. Reusing the buffers matters on CPU:
  a fresh buffer is memory the kernel must fault in and zero page by page, and a worker that
  has run a while has big ones (32 slots x 554 columns of the ~42M bench model: 554 MiB);
  making them anew at every relayout cost seconds in a burst of admissions.
- the rows admitted in one step make room once, for the longest of them (`make_room`).

Buffers are zero-initialised and only ever hold real (finite) KV values, so a masked column can
never inject NaN into the attention (0 x NaN would): a row whose logits went NaN/inf is scrubbed
when it leaves (`leave(scrub=True)`), since a moved window leaves old columns behind.
Shapes: n = live rows, W = end - start (window), H heads, D head size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


@dataclass
class SlotGeometry:
    """Where the live rows' tokens are; shared by every layer of one SlotCache."""

    slots: int
    capacity: int  # columns per buffer
    rows: int = 0  # live rows n
    start: int = 0
    end: int = 0
    lens: list[int] = field(default_factory=list)  # tokens cached per live row

    @property
    def window(self) -> int:
        return self.end - self.start


class SlotLayer(DynamicLayer):
    """A cache layer whose keys/values are views `[n, H, W + q, D]` into slot buffers."""

    def __init__(self, geo: SlotGeometry):
        super().__init__()
        self.geo = geo
        self.kbuf: torch.Tensor | None = None
        self.vbuf: torch.Tensor | None = None

    def allocate(self, heads: int, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (self.geo.slots, heads, self.geo.capacity, dim)
        self.kbuf = torch.zeros(shape, dtype=dtype, device=device)
        self.vbuf = torch.zeros(shape, dtype=dtype, device=device)
        self.dtype, self.device, self.is_initialized = dtype, device, True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states: [n, H, q, D], written at columns [end, end + q) of every live row
        g = self.geo
        if self.kbuf is None:
            self.allocate(
                key_states.shape[1], key_states.shape[3], key_states.dtype, key_states.device
            )
        assert self.kbuf is not None and self.vbuf is not None
        n, q = key_states.shape[0], key_states.shape[2]
        self.kbuf[:n, :, g.end : g.end + q] = key_states
        self.vbuf[:n, :, g.end : g.end + q] = value_states
        self.keys = self.kbuf[:n, :, g.start : g.end + q]
        self.values = self.vbuf[:n, :, g.start : g.end + q]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.geo.window

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.geo.window + query_length, 0


class SlotCache:
    """The slot buffers of every layer plus their shared geometry (see the module docstring)."""

    def __init__(self, config: Any, slots: int, capacity: int = 256):
        self.geo = SlotGeometry(slots=slots, capacity=max(8, capacity))
        self.cache = DynamicCache(config=config)
        self.layers = [SlotLayer(self.geo) for _ in self.cache.layers]
        self.cache.layers = list(self.layers)

    # ---- the decode step ------------------------------------------------------------------

    def reserve(self, q: int) -> None:
        """Make room for q more columns at `end` before a forward."""
        if self.geo.end + q > self.geo.capacity:
            self._relayout(self.geo.end - self.geo.start + q)

    def advance(self, q: int) -> None:
        """After a forward wrote q columns for every live row."""
        g = self.geo
        g.end += q
        g.lens = [n + q for n in g.lens]

    def mask_and_positions(self, q: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> attention mask [n, W + q] (1 = attend) and position ids [n, q] for the next q
        tokens of every live row."""
        g = self.geo
        lens = torch.tensor(g.lens, dtype=torch.long, device=device)  # [n]
        cols = torch.arange(g.window + q, device=device)  # [W + q]
        mask = (cols[None, :] >= (g.window - lens)[:, None]).long()  # [n, W + q]
        pos = lens[:, None] + torch.arange(q, device=device)[None, :]  # [n, q]
        return mask, pos

    # ---- rows joining and leaving ---------------------------------------------------------

    @property
    def free(self) -> int:
        return self.geo.slots - self.geo.rows

    def join(self, kvs: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Add a row whose KV per layer is (keys, values) `[H, L, D]`; returns its row index."""
        g = self.geo
        if g.rows >= g.slots:
            raise RuntimeError("no free slot")
        length = kvs[0][0].shape[1]
        self.make_room(length)
        for layer, (k, v) in zip(self.layers, kvs, strict=True):
            if layer.kbuf is None:
                layer.allocate(k.shape[0], k.shape[2], k.dtype, k.device)
            assert layer.kbuf is not None and layer.vbuf is not None
            layer.kbuf[g.rows, :, g.end - length : g.end] = k
            layer.vbuf[g.rows, :, g.end - length : g.end] = v
        g.lens.append(length)
        g.rows += 1
        g.start = min(g.start, g.end - length) if g.rows > 1 else g.end - length
        return g.rows - 1

    def make_room(self, length: int) -> None:
        """Make `end` at least `length`, so that a row of `length` tokens can join."""
        g = self.geo
        if g.rows == 0:
            g.start = g.end = 0
        if length > g.end:
            self._relayout(max(g.window, length), min_end=length)

    def leave(self, row: int, scrub: bool = False) -> None:
        """Drop live row `row`: the last live row moves into its place. `scrub`: the row's
        values may be NaN/inf (its logits were); zero its whole buffer row first."""
        g = self.geo
        last = g.rows - 1
        if scrub:
            for layer in self.layers:
                if layer.kbuf is not None and layer.vbuf is not None:
                    layer.kbuf[row].zero_()
                    layer.vbuf[row].zero_()
        if row != last:
            for layer in self.layers:
                if layer.kbuf is None or layer.vbuf is None:
                    continue
                layer.kbuf[row, :, g.start : g.end] = layer.kbuf[last, :, g.start : g.end]
                layer.vbuf[row, :, g.start : g.end] = layer.vbuf[last, :, g.start : g.end]
            g.lens[row] = g.lens[last]
        g.lens.pop()
        g.rows = last
        g.start = g.end - max(g.lens) if g.lens else g.end

    def clear(self) -> None:
        g = self.geo
        g.rows, g.lens, g.start, g.end = 0, [], 0, 0

    def shrink(self, slots: int) -> None:
        """Lower the slot count (after running out of memory); live rows must already fit."""
        if self.geo.rows > slots:
            raise RuntimeError("shrink below the live rows")
        self.geo.slots = slots
        if self.geo.rows == 0:  # nothing to keep: the next join allocates at the new size
            for layer in self.layers:
                layer.kbuf = layer.vbuf = None

    def _relayout(self, window: int, min_end: int = 0) -> None:
        """Move the live window so that there are at least `window` columns and `end` is at
        least `min_end`: within the buffers when they have room, else into bigger ones."""
        g = self.geo
        old_w = g.window
        new_end = max(min_end, old_w)
        if g.rows == 0 and new_end <= g.capacity:
            g.start = g.end = new_end  # nothing live to move
            return
        # In place when the buffers keep a third of their columns free after the move, so
        # that moves stay rare (one copy of the window per capacity - window steps).
        if 3 * max(window, new_end) <= 2 * g.capacity and self._move_in_place(new_end):
            return
        capacity = max(2 * max(window, new_end), g.capacity)
        # Every new buffer is made before any is swapped in: running out of memory half-way
        # leaves the cache as it was (the loop then preempts rows and retries with fewer slots).
        moved = [
            (
                layer,
                _moved(layer.kbuf, g, new_end, capacity),
                _moved(layer.vbuf, g, new_end, capacity),
            )
            for layer in self.layers
            if layer.kbuf is not None and layer.vbuf is not None
        ]
        for layer, k, v in moved:
            layer.kbuf, layer.vbuf = k, v
        g.capacity = capacity
        g.start, g.end = new_end - old_w, new_end

    def _move_in_place(self, new_end: int) -> bool:
        """Move the live window within the current buffers (False when they must be made
        anew: not allocated yet, or sized for more slots than a preemption left)."""
        g = self.geo
        bufs = [b for layer in self.layers for b in (layer.kbuf, layer.vbuf) if b is not None]
        if not bufs or any(b.shape[0] != g.slots or b.shape[2] != g.capacity for b in bufs):
            return False
        n, d = g.rows, new_end - g.end
        plan = _shift_plan(g.start, g.end, d)
        if plan is None:  # through copies, all made before any buffer is written
            temps = [b[:n, :, g.start : g.end].clone() for b in bufs]
            for b, t in zip(bufs, temps, strict=True):
                b[:n, :, g.start + d : g.end + d] = t
        else:
            for b in bufs:
                for lo, hi in plan:
                    b[:n, :, lo + d : hi + d] = b[:n, :, lo:hi]
        g.start, g.end = g.start + d, new_end
        return True


def _shift_plan(start: int, end: int, d: int) -> list[tuple[int, int]] | None:
    """Column ranges of [start, end) to move by d, one after another, such that no copy
    overwrites a column not yet moved (copy_ refuses overlapping memory); None when that takes
    more than four copies (a short move of a wide window): then a temporary copy is cheaper."""
    step, w = abs(d), end - start
    if step >= w:
        return [(start, end)]
    if 4 * step < w:
        return None
    ranges = [(lo, min(lo + step, end)) for lo in range(start, end, step)]
    return ranges if d < 0 else ranges[::-1]  # moving left: leftmost first, and vice versa


def _moved(buf: torch.Tensor, g: SlotGeometry, new_end: int, capacity: int) -> torch.Tensor:
    """buf [S, H, C, D] -> a zeroed [slots, H, capacity, D] holding the live rows' window
    so that it ends at `new_end` (slots, not S: after a preemption lowered them, less memory)."""
    out = buf.new_zeros((g.slots, buf.shape[1], capacity, buf.shape[3]))
    w = g.window
    out[: g.rows, :, new_end - w : new_end] = buf[: g.rows, :, g.start : g.end]
    return out
