"""The window table: sparse, O(1) lookup, memory per window (and per block), never per granule.

A million leases in a sorted structure cost a bisect per access: ~20 comparisons that each
miss the CPU caches (the keys are separate int objects spread over hundreds of MiB), 2-4 us
per lookup (bench/bench_leases.py, section d), more than all the rest of a resident read. So
the table is two-level instead, as a page table is: the aperture is cut into blocks of
`BLOCK_UNITS` units (a unit is the largest power of two dividing the granule, so every window
boundary is on one), and a dict maps a block's number to what lies in that block:

- one `Window`: the only window that meets the block (a window larger than a block is
  registered in every block it covers: one dict entry per block, whatever its length);
- `_Few`: 2 to `FEW_MAX` windows, sorted, found by one bisect over at most `FEW_MAX` starts;
- `_Slots`: more than that, one slot per unit of the block holding the window that covers it
  (or None), so the lookup is an index. Only a crowded block pays for its slots: they cost at
  most 8 * BLOCK_UNITS / FEW_MAX = 128 bytes per window, and 8 bytes per window in a block
  full of one-granule windows.

A lookup is one dict probe and one index (or a short bisect), whatever the table's size;
before it, the window found last (outside slots) is tried, since accesses come in runs. The
order that the engine and the queries need (`__iter__`, `overlapping`) comes from walking the
blocks in order; those walk, they do not look up.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator

from devmodel.leases.window import Window

BLOCK_UNITS = 512
"""Units per block: a 2 MiB block with 4 KiB granules, 1 GiB with 2 MiB ones."""
FEW_MAX = 32
"""The most windows a block keeps as a sorted list; one more and it gets its slots. A block
with slots goes back to a list once it holds half as many (not at FEW_MAX: a block crossing
the limit back and forth would rebuild its slots every time)."""


class _Few:
    """2 to FEW_MAX windows that meet one block, sorted by start, with their starts."""

    __slots__ = ("starts", "windows")

    def __init__(self, windows: list[Window]) -> None:
        self.windows = windows
        self.starts = [w.start for w in windows]

    def insert(self, window: Window) -> None:
        i = bisect_right(self.starts, window.start)
        self.starts.insert(i, window.start)
        self.windows.insert(i, window)

    def discard(self, window: Window) -> None:
        i = self.windows.index(window)
        del self.starts[i]
        del self.windows[i]


class _Slots(list[Window | None]):
    """One slot per unit of a crowded block; `members`: how many windows meet the block."""

    __slots__ = ("members",)

    def __init__(self, windows: Iterable[Window], base: int, unit_shift: int, units: int) -> None:
        super().__init__([None] * units)
        self.members = 0
        for w in windows:
            self.fill(w, w, base, unit_shift)
            self.members += 1

    def fill(self, window: Window, value: Window | None, base: int, unit_shift: int) -> None:
        """Set the slots `window` covers in this block (which starts at `base`) to `value`."""
        lo = max(window.start - base, 0) >> unit_shift
        hi = min((window.start + window.length - base) >> unit_shift, len(self))
        self[lo:hi] = [value] * (hi - lo)

    def windows(self) -> list[Window]:
        """The windows that meet the block, in order, each once."""
        found: list[Window] = []
        last = None
        for w in self:
            if w is not None and w is not last:
                found.append(w)
                last = w
        return found


_Block = Window | _Few | _Slots


class WindowTable:
    """Non-overlapping windows, each starting and ending on a multiple of `unit`.

    `block_units` (a power of two) and `few_max` (at least 2) are the module's constants but
    for tests, which make them small so that a few windows cross every threshold.
    """

    __slots__ = (
        "_block_shift",
        "_blocks",
        "_count",
        "_few_again",
        "_few_max",
        "_last",
        "_mask",
        "_unit",
        "_unit_shift",
        "_units",
    )

    def __init__(
        self, unit: int = 1, *, block_units: int = BLOCK_UNITS, few_max: int = FEW_MAX
    ) -> None:
        if unit <= 0 or block_units <= 0 or block_units & (block_units - 1) or few_max < 2:
            raise ValueError(f"bad table geometry: {unit}, {block_units}, {few_max}")
        unit &= -unit  # the largest power of two dividing it: every boundary is on it too
        self._unit = unit
        self._unit_shift = unit.bit_length() - 1
        self._units = block_units
        self._mask = block_units - 1
        self._block_shift = self._unit_shift + block_units.bit_length() - 1
        self._few_max = few_max
        self._few_again = max(few_max // 2, 2)
        self._blocks: dict[int, _Block] = {}
        self._count = 0
        # The window found last in a block without slots, or None; remove() forgets it.
        # Accesses come in runs on one window, and this check is cheaper than the dict probe
        # (~60 ns less per access with one lease). A window found through slots is not
        # remembered: the check would then read that window's start next time, a cache miss
        # at a million windows that the slots exist to avoid.
        self._last: Window | None = None

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Window]:
        """Every window once, in order of start (a walk: for queries, never the hot path)."""
        blocks = self._blocks
        last = None
        for b in sorted(blocks):
            v = blocks[b]
            members = [v] if type(v) is Window else v.windows if type(v) is _Few else None
            if members is None:
                assert isinstance(v, _Slots)
                members = v.windows()
            for w in members:
                if w is not last:  # a window spanning blocks shows in each of them
                    yield w
                    last = w

    def find(self, offset: int) -> Window | None:
        """The window containing `offset`, if any."""
        w = self._last
        if w is not None and w.start <= offset < w.start + w.length:
            return w
        v = self._blocks.get(offset >> self._block_shift)
        if v is None:
            return None
        if type(v) is _Slots:
            return v[(offset >> self._unit_shift) & self._mask]
        if type(v) is Window:
            w = v
        else:
            assert type(v) is _Few
            i = bisect_right(v.starts, offset) - 1
            if i < 0:
                return None
            w = v.windows[i]
        if w.start <= offset < w.start + w.length:
            self._last = w
            return w
        return None

    def overlapping(self, start: int, end: int) -> list[Window]:
        """Windows that intersect [start, end), in order."""
        if end <= start:
            return []
        blocks = self._blocks
        shift, unit_shift = self._block_shift, self._unit_shift
        first, final = start >> shift, (end - 1) >> shift
        numbers: Iterable[int]
        if final - first < len(blocks):
            numbers = range(first, final + 1)
        else:  # a range wider than the table: walk what is there instead
            numbers = sorted(b for b in blocks if first <= b <= final)
        found: list[Window] = []
        last = None
        for b in numbers:
            v = blocks.get(b)
            if v is None:
                continue
            candidates: list[Window] | list[Window | None]
            if type(v) is Window:
                candidates = [v]
            elif type(v) is _Few:
                lo = max(bisect_right(v.starts, start) - 1, 0)
                candidates = v.windows[lo : bisect_left(v.starts, end)]
            else:
                assert isinstance(v, _Slots)
                base = b << shift
                lo = (max(start, base) - base) >> unit_shift
                top = min(end, base + (self._units << unit_shift)) - base
                candidates = v[lo : ((top - 1) >> unit_shift) + 1]
            for w in candidates:
                if w is not None and w is not last and w.start < end and w.start + w.length > start:
                    found.append(w)
                    last = w
        return found

    def add(self, window: Window) -> None:
        """Add `window`: it must overlap no other, but replaces one that has the same start."""
        start, length = window.start, window.length
        unit = self._unit
        if length <= 0 or start % unit or length % unit:
            raise ValueError(f"window {start:#x}+{length:#x} is not on {unit:#x} units")
        old = self.find(start)
        if old is not None and old.start == start:
            self.remove(old)
        blocks = self._blocks
        shift, unit_shift = self._block_shift, self._unit_shift
        for b in range(start >> shift, ((start + length - 1) >> shift) + 1):
            v = blocks.get(b)
            if v is None:
                blocks[b] = window
            elif type(v) is Window:
                blocks[b] = _Few([v, window] if v.start < start else [window, v])
            elif type(v) is _Few:
                if len(v.windows) < self._few_max:
                    v.insert(window)
                else:
                    blocks[b] = _Slots([*v.windows, window], b << shift, unit_shift, self._units)
            else:
                assert isinstance(v, _Slots)
                v.fill(window, window, b << shift, unit_shift)
                v.members += 1
        self._count += 1

    def remove(self, window: Window) -> None:
        """Remove `window` if the table holds it (one it does not hold is no error)."""
        start = window.start
        if self.find(start) is not window:
            return
        if self._last is window:
            self._last = None
        blocks = self._blocks
        shift, unit_shift = self._block_shift, self._unit_shift
        for b in range(start >> shift, ((start + window.length - 1) >> shift) + 1):
            v = blocks[b]
            if type(v) is Window:
                del blocks[b]
            elif type(v) is _Few:
                v.discard(window)
                if len(v.windows) == 1:
                    blocks[b] = v.windows[0]
            else:
                assert isinstance(v, _Slots)
                v.fill(window, None, b << shift, unit_shift)
                v.members -= 1
                if v.members <= self._few_again:  # >= 2: still a list of two or more
                    blocks[b] = _Few(v.windows())
        self._count -= 1
