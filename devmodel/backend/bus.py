"""The region bus: every region of the device in one table, found by index or by guest address.

Before this table each transport picked the region for an access itself (vfio-user by region
index in two places, Xen by scanning the BAR ranges it had claimed), and a BAR move had to be
noticed by each of them. Here a region is registered once, every access finds its region with
one lookup, and a BAR move is one `move` that rebuilds the address table and tells whoever
subscribed (the Xen transport re-claims its MMIO ranges from that notification). The model is
rust-vmm vm-device's `Bus`: ranges in, one lookup out; nothing here knows about sockets.

Two ways in, because transports address regions two ways:
- vfio-user names a region by its vfio index (0-5 BARs, 7 config): `lookup(index)`, one dict
  lookup in C, kept that cheap because 8-byte BAR0 reads are the hot path;
- Xen gives a guest physical address: `route(address)`, a bisect over the BARs that decode now
  (a BAR whose memory decoding is off, or that the guest never programmed, is on no address).
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from devmodel.pci.errors import AccessError

__all__ = [
    "BusListener",
    "MappedRange",
    "ReadFn",
    "ReadNowFn",
    "Region",
    "RegionBus",
    "WriteFn",
    "WriteNowFn",
    "never_now",
    "never_now_write",
    "refusing_region",
]

ReadFn = Callable[[int, int], Coroutine[Any, Any, bytes]]
"""(offset, size) -> the bytes read; raises AccessError when refused."""
WriteFn = Callable[[int, bytes], Coroutine[Any, Any, None]]
"""(offset, data); raises AccessError when refused."""
ReadNowFn = Callable[[int, int], bytes | None]
"""(offset, size) -> the bytes, when the read needs no wait; None: await `read` instead (it
may wait, or be refused). Never raises, never counts a read it did not do."""
WriteNowFn = Callable[[int, bytes], bool]
"""(offset, data) -> True once written, when the write needs no wait; False: await `write`
instead (it may wait, or be refused). Never raises, never counts a write it did not do."""


def never_now(offset: int, size: int) -> None:
    """The `read_now` of a region whose reads are always awaited."""


def never_now_write(offset: int, data: bytes) -> bool:
    """The `write_now` of a region whose writes are always awaited."""
    return False


@dataclass(slots=True, eq=False)
class Region:
    """One entry of the bus: a vfio region index, its size and the code that serves it."""

    index: int
    name: str
    size: int
    read: ReadFn
    write: WriteFn
    address: int | None = None
    """Where the guest decodes it now (BARs only); None while it decodes nowhere."""
    read_now: ReadNowFn = never_now
    """`read` without a coroutine when it needs no wait (BAR0's resident windows, BAR2)."""
    write_now: WriteNowFn = never_now_write
    """`write` without a coroutine when it needs no wait (the same regions)."""


class MappedRange(NamedTuple):
    """A region on the guest address bus: [start, end] (inclusive, as Xen's ranges are)."""

    start: int
    end: int
    bar: int


BusListener = Callable[[tuple[MappedRange, ...]], None]
"""Told the whole new address map after every change of it."""


def refusing_region(index: int, name: str = "") -> Region:
    """The answer for an index no region has: EINVAL, not counted (nothing of ours was hit)."""

    async def read(offset: int, size: int) -> bytes:
        raise AccessError(errno.EINVAL, f"region {index} cannot be read")

    async def write(offset: int, data: bytes) -> None:
        raise AccessError(errno.EINVAL, f"region {index} cannot be written")

    return Region(index, name or f"region {index}", 0, read, write)


class _IndexTable(dict[int, Region]):
    """Index -> region; an index with no region gets a refusing one (made, never stored).

    A dict so that a hit is one C-level `__getitem__`, no Python frame: `lookup` is that bound
    method, and it is on the hot path of every vfio-user access.
    """

    def __missing__(self, index: int) -> Region:
        return refusing_region(index)


class RegionBus:
    """Regions registered once by vfio index; accesses routed by index or by guest address."""

    __slots__ = ("_by_index", "_defined", "_listeners", "_map", "_starts", "lookup")

    def __init__(self, count: int) -> None:
        self._by_index = _IndexTable((i, refusing_region(i)) for i in range(count))
        self._defined = [False] * count
        self.lookup: Callable[[int], Region] = self._by_index.__getitem__
        """The region an access to vfio index `index` goes to; a refusing one if none is there.

        The hot path: one dict lookup in C, no Python frame.
        """
        self._map: tuple[MappedRange, ...] = ()
        self._starts: list[int] = []
        self._listeners: list[BusListener] = []

    # --- the table ----------------------------------------------------------------------------

    def register(self, region: Region) -> None:
        """Put `region` at its index, once; its address comes later, through `move`."""
        if not 0 <= region.index < len(self._by_index):
            raise ValueError(f"region index {region.index} is outside the bus")
        if self._defined[region.index]:
            raise ValueError(f"region {region.index} is already registered")
        self._by_index[region.index] = region
        self._defined[region.index] = True
        if region.address is not None:
            self._rebuild()

    def get(self, index: int) -> Region | None:
        """The region registered at `index` (size 0 for a defined but absent one), else None."""
        if 0 <= index < len(self._by_index) and self._defined[index]:
            return self._by_index[index]
        return None

    def regions(self) -> tuple[Region, ...]:
        return tuple(self._by_index.values())

    # --- the address map ----------------------------------------------------------------------

    def route(self, address: int) -> tuple[Region, int] | None:
        """The region decoding guest `address` and the offset in it, or None."""
        at = bisect.bisect_right(self._starts, address) - 1
        if at < 0:
            return None
        start, end, index = self._map[at]
        if address > end:
            return None
        return self._by_index[index], address - start

    def overlapping(self, start: int, end: int) -> MappedRange | None:
        """The first mapped region meeting [start, end) (exclusive end), or None."""
        for r in self._map:
            if r.start < end and start <= r.end:
                return r
        return None

    @property
    def mapped(self) -> tuple[MappedRange, ...]:
        """Every region that decodes now, by address."""
        return self._map

    def move(self, addresses: Mapping[int, int | None]) -> bool:
        """Set where regions decode (None: nowhere); one table update, listeners told once.

        True if the address map changed. This is the one place a BAR move lands, whatever made
        it (a config write, memory decoding toggled, a reset).
        """
        for index, address in addresses.items():
            if self.get(index) is None:
                raise ValueError(f"no region {index} to move")
            self._by_index[index].address = address
        before = self._map
        self._rebuild()
        if self._map == before:
            return False
        for listener in list(self._listeners):
            listener(self._map)
        return True

    def _rebuild(self) -> None:
        self._map = tuple(
            sorted(
                MappedRange(r.address, r.address + r.size - 1, r.index)
                for r in self._by_index.values()
                if r.address is not None and r.size
            )
        )
        self._starts = [r.start for r in self._map]

    def subscribe(self, listener: BusListener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: BusListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)
