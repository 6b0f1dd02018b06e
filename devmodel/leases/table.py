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

Fast entries: with a million windows the slot and the window it points to are two dependent
cache misses per access (~300 ns each here), most of what a million windows add to a resident
read. So each unit of a crowded block also has a fast entry, one int saying how to access the
unit's memory directly (`fast_entry`): 0 for "take the normal path", or fd, fd_base and
writability packed together for a RESIDENT memfd window. The entries are one flat array over
the whole aperture (`size`), a private anonymous mapping of 8 bytes per unit that only crowded
blocks touch (a 4 KiB page per crowded block of 512 units; the rest is never backed), and a
crowded block's slots come with a view of its part of it. The engine's resident access reads
one int there, indexed by the offset alone (`find_fast`: no dict probe, no block object, one
cache line), and never the window. One array rather than one per block: a per-block array was
a dict probe and the block's array object before its entry, ~225 against ~100 ns a read at a
million windows (docs/performance.md, "A million leases").

The revoke guarantee then lives in the entries too: an entry may be non-zero only while its
window is RESIDENT with that fd. The table computes entries when it places a window (`add`,
slot rebuilds), clears them when it removes one or a block gives up its slots; whoever changes
a window's state, fd, fd_base, prot or mem calls `refresh` in the same synchronous step (the
engine does both in one method, `LeaseEngine._update`).
"""

from __future__ import annotations

import mmap
import platform
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from typing import TypeAlias

from devmodel.leases.states import WindowState
from devmodel.leases.window import Window
from devmodel_wire.lease.constants import PROT_WRITE

BLOCK_UNITS = 512
"""Units per block: a 2 MiB block with 4 KiB granules, 1 GiB with 2 MiB ones."""
FEW_MAX = 32
"""The most windows a block keeps as a sorted list; one more and it gets its slots. A block
with slots goes back to a list once it holds half as many (not at FEW_MAX: a block crossing
the limit back and forth would rebuild its slots every time)."""


FAST_FD_BITS = 22
"""Bits of the fd in a fast entry: any fd below 4,194,304 (Linux's default cap is 2**20)."""
FAST_SHIFT = FAST_FD_BITS + 1
"""Where fd_base starts in a fast entry; below it, the fd and (bit 0) writability."""
FAST_FD_MASK = (1 << FAST_FD_BITS) - 1
_FAST_BASE_LIMIT = 1 << (63 - FAST_SHIFT)  # fd_base must lie in [-limit, limit): 1 TiB
_RESIDENT = WindowState.RESIDENT
# Python names it from 3.13 only; 0x4000 is Linux's value on x86 and arm (asm-generic), and
# elsewhere the flag is left out (a strict-overcommit host ignores it anyway).
_MAP_NORESERVE: int = getattr(
    mmap,
    "MAP_NORESERVE",
    0x4000 if platform.machine() in ("x86_64", "i686", "aarch64", "armv7l") else 0,
)


def fast_entry(window: Window | None) -> int:
    """The fast entry for `window`'s units: (fd_base << FAST_SHIFT) | (fd << 1) | writable, or
    0 (take the normal path) unless the window is RESIDENT, memfd-backed (pread/pwrite: a
    dma-buf lease needs its mapping and sync) and its fd and fd_base fit the packing.

    Decoding: fd = (entry >> 1) & FAST_FD_MASK, the byte at aperture offset o is at fd offset
    (entry >> FAST_SHIFT) + o, writable if entry & 1. Never 0 for a served window (fd > 0)."""
    if (
        window is None
        or window.state is not _RESIDENT
        or window.mem is not None
        or not 0 < window.fd <= FAST_FD_MASK
        or not -_FAST_BASE_LIMIT <= window.fd_base < _FAST_BASE_LIMIT
    ):
        return 0
    return (
        (window.fd_base << FAST_SHIFT) | (window.fd << 1) | (1 if window.prot & PROT_WRITE else 0)
    )


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


_Entries: TypeAlias = "memoryview | array[int]"


class _Slots(list[Window | None]):
    """One slot per unit of a crowded block; `members`: how many windows meet the block;
    `fast`: each unit's fast entry (module docstring), `fast_entry` of its slot's window: the
    block's part of the table's flat array (all 0 until now), or an array of its own in a
    table without one."""

    __slots__ = ("fast", "members")

    def __init__(
        self,
        windows: Iterable[Window],
        base: int,
        unit_shift: int,
        units: int,
        fast: _Entries | None,
    ) -> None:
        super().__init__([None] * units)
        self.fast: _Entries = array("q", bytes(8 * units)) if fast is None else fast
        self.members = 0
        for w in windows:
            self.fill(w, w, base, unit_shift)
            self.members += 1

    def fill(self, window: Window, value: Window | None, base: int, unit_shift: int) -> None:
        """Set the slots `window` covers in this block (which starts at `base`) to `value`,
        and their fast entries to `value`'s."""
        lo = max(window.start - base, 0) >> unit_shift
        hi = min((window.start + window.length - base) >> unit_shift, len(self))
        entry = fast_entry(value)
        if hi - lo == 1:  # a one-unit window, the common case in a crowded block
            self[lo] = value
            self.fast[lo] = entry
        else:
            self[lo:hi] = [value] * (hi - lo)
            self.fast[lo:hi] = array("q", [entry]) * (hi - lo)

    def clear_entries(self) -> None:
        """Every fast entry 0: the block gives up its slots (the flat array stays shared)."""
        self.fast[:] = array("q", bytes(8 * len(self)))

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

    `size`: how far windows may reach (the aperture's size), which the flat array of fast
    entries covers; 0 (unknown) keeps the entries per crowded block and `find_fast` never
    reads them (for tests of the rest). `block_units` (a power of two) and `few_max` (at least
    2) are the module's constants but for tests, which make them small so that a few windows
    cross every threshold.
    """

    __slots__ = (
        "_block_shift",
        "_blocks",
        "_count",
        "_crowded",
        "_entries",
        "_few_again",
        "_few_max",
        "_last",
        "_mask",
        "_size",
        "_unit",
        "_unit_shift",
        "_units",
    )

    def __init__(
        self,
        unit: int = 1,
        *,
        size: int = 0,
        block_units: int = BLOCK_UNITS,
        few_max: int = FEW_MAX,
    ) -> None:
        if (
            unit <= 0
            or size < 0
            or block_units <= 0
            or block_units & (block_units - 1)
            or few_max < 2
        ):
            raise ValueError(f"bad table geometry: {unit}, {size}, {block_units}, {few_max}")
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
        self._crowded = 0  # blocks with slots (and fast entries); `refresh` skips a table of none
        # The fast entries of the whole aperture, whole blocks of them: untouched pages of a
        # private anonymous mapping read as zeros and cost nothing (MAP_NORESERVE: a 1 TiB
        # aperture of 4 KiB units is 2 GiB of address space, never of memory).
        # A host that refuses the address space (strict overcommit) gets per-block entries and
        # the slower lookup instead (size 0 below): correct, one cache miss more per access.
        self._size = 0
        self._entries = memoryview(array("q"))
        if size:
            blocks = -(-size >> self._block_shift)
            try:
                flat = mmap.mmap(
                    -1,
                    (blocks * block_units) << 3,
                    flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
                )
            except OSError:
                pass
            else:
                self._entries = memoryview(flat).cast("q")
                self._size = size
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

    def find_fast(self, offset: int) -> Window | int | None:
        """The unit's fast entry (module docstring) when `offset` lies in a crowded block and
        the entry is not 0; otherwise what `find` answers. The resident access's lookup: in a
        crowded block it reads one int from one cache line, not the slot and then the window.

        `find`'s code again rather than a call to it: a call would cost the one-lease access
        ~50 ns when the window found last does not hold the offset."""
        w = self._last
        if w is not None and w.start <= offset < w.start + w.length:
            return w
        if 0 <= offset < self._size:
            entry = self._entries[offset >> self._unit_shift]
            if entry:
                return entry
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

    def _view(self, b: int) -> memoryview | None:
        """Block `b`'s part of the flat array of fast entries (None without one)."""
        entries = self._entries
        if not self._size:
            return None
        first = b * self._units
        return entries[first : first + self._units]

    def refresh(self, window: Window) -> None:
        """Recompute the fast entries of `window`'s units in every crowded block it covers,
        after its state, fd, fd_base, prot or mem changed. A window the table does not hold
        (removed, or replaced at its start) is left alone, as are slots another window holds."""
        if not self._crowded:
            return  # no block has entries: the revoke path of a small table pays one test
        start = window.start
        blocks = self._blocks
        shift, unit_shift = self._block_shift, self._unit_shift
        entry: int | None = None  # computed at the first crowded block it covers, if any
        for b in range(start >> shift, ((start + window.length - 1) >> shift) + 1):
            v = blocks.get(b)
            if type(v) is not _Slots:
                continue
            base = b << shift
            lo = max(start - base, 0) >> unit_shift
            if v[lo] is not window:
                continue
            hi = min((start + window.length - base) >> unit_shift, len(v))
            if entry is None:
                entry = fast_entry(window)
            if hi - lo == 1:
                v.fast[lo] = entry
            else:
                v.fast[lo:hi] = array("q", [entry]) * (hi - lo)

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
                    blocks[b] = _Slots(
                        [*v.windows, window], b << shift, unit_shift, self._units, self._view(b)
                    )
                    self._crowded += 1
            else:
                assert isinstance(v, _Slots)
                v.fill(window, window, b << shift, unit_shift)
                v.members += 1
        self._count += 1

    def replace(self, old: Window, new: Window) -> None:
        """Put `new` in the place of `old`, which the table holds and which covers the same
        range: every block keeps its form and only swaps the reference (and a crowded block
        the fast entries), where `remove` then `add` would look both up and rebuild the
        block's list. The grant that answers a page-in replaces the window it was asked for
        this way, while the fault waits for it."""
        start = old.start
        if new.start != start or new.length != old.length or self.find(start) is not old:
            raise ValueError(f"{new.start:#x}+{new.length:#x} cannot replace {old}")
        if self._last is old:
            self._last = new
        blocks = self._blocks
        shift, unit_shift = self._block_shift, self._unit_shift
        for b in range(start >> shift, ((start + old.length - 1) >> shift) + 1):
            v = blocks[b]
            if type(v) is Window:
                blocks[b] = new
            elif type(v) is _Few:
                v.windows[v.windows.index(old)] = new
            else:
                assert isinstance(v, _Slots)
                v.fill(old, new, b << shift, unit_shift)

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
                    v.clear_entries()
                    blocks[b] = _Few(v.windows())
                    self._crowded -= 1
        self._count -= 1
