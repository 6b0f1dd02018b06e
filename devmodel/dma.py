"""The client's DMA map table, kept so the protocol is honoured, never used to reach memory.

devmodel does no DMA: lent memory must never be reachable by DMA (shared/DESIGN.md), and the
device has no other reason to touch guest RAM. The table still has to be exact, because
DMA_UNMAP must match a previous DMA_MAP and the fds must be closed when a map goes away.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass


class DmaError(Exception):
    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


@dataclass(slots=True)
class DmaRegion:
    address: int
    size: int
    offset: int
    flags: int
    fd: int | None
    # The map covers one of our own BARs: recorded, and never used (DMA into lent memory is a
    # guest bug per the design).
    overlaps_bar: bool = False


class DmaTable:
    """Sorted, non-overlapping DMA regions with O(log n) insert checks."""

    def __init__(self, max_maps: int) -> None:
        self.max_maps = max_maps
        self._starts: list[int] = []
        self._regions: list[DmaRegion] = []

    def __len__(self) -> int:
        return len(self._regions)

    def __iter__(self) -> Iterator[DmaRegion]:
        return iter(self._regions)

    def add(self, region: DmaRegion) -> None:
        """Insert, taking ownership of `region.fd` only on success."""
        if len(self._regions) >= self.max_maps:
            raise DmaError(errno.ENOSPC, f"already {self.max_maps} DMA regions mapped")
        i = bisect.bisect_right(self._starts, region.address)
        if i and self._regions[i - 1].address + self._regions[i - 1].size > region.address:
            raise DmaError(errno.EEXIST, f"DMA region {region.address:#x} overlaps a mapped one")
        if i < len(self._regions) and region.address + region.size > self._starts[i]:
            raise DmaError(errno.EEXIST, f"DMA region {region.address:#x} overlaps a mapped one")
        self._starts.insert(i, region.address)
        self._regions.insert(i, region)

    def remove(self, address: int, size: int) -> DmaRegion:
        i = bisect.bisect_left(self._starts, address)
        if i == len(self._starts) or self._starts[i] != address or self._regions[i].size != size:
            raise DmaError(errno.ENOENT, f"no DMA region is mapped at {address:#x}+{size:#x}")
        del self._starts[i]
        region = self._regions.pop(i)
        _close(region.fd)
        return region

    def clear(self) -> None:
        for region in self._regions:
            _close(region.fd)
        self._starts.clear()
        self._regions.clear()


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
