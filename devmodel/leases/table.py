"""The window table: sparse, sorted, O(log n) lookup, memory per window not per granule."""

from __future__ import annotations

from collections.abc import Iterator

from sortedcontainers import SortedDict

from devmodel.leases.window import Window


class WindowTable:
    """Non-overlapping windows keyed by start offset."""

    __slots__ = ("_by_start",)

    def __init__(self) -> None:
        self._by_start: SortedDict[int, Window] = SortedDict()

    def __len__(self) -> int:
        return len(self._by_start)

    def __iter__(self) -> Iterator[Window]:
        return iter(self._by_start.values())

    def find(self, offset: int) -> Window | None:
        """The window containing `offset`, if any."""
        d = self._by_start
        i = d.bisect_right(offset)
        if not i:
            return None
        w = d.peekitem(i - 1)[1]
        return w if offset < w.start + w.length else None

    def overlapping(self, start: int, end: int) -> list[Window]:
        """Windows that intersect [start, end), in order."""
        d = self._by_start
        i = d.bisect_right(start)
        if i:
            i -= 1
        found = []
        keys = d.keys()
        n = len(d)
        while i < n:
            w = d[keys[i]]
            if w.start >= end:
                break
            if w.start + w.length > start:
                found.append(w)
            i += 1
        return found

    def add(self, window: Window) -> None:
        self._by_start[window.start] = window

    def remove(self, window: Window) -> None:
        if self._by_start.get(window.start) is window:
            del self._by_start[window.start]
