"""The window table: sparse, sorted, O(log n) lookup, memory per window not per granule.

Lookups go through `irange` (bisects over the sorted key lists) and never through positional
indexing (`keys()[i]`, `peekitem`): sortedcontainers keeps a positional index that it
rebuilds after every insert that splits a sublist, and with a million leases being granted
that rebuild was half the cost of a grant (bench/bench_leases.py). The window found last is
remembered: guest accesses come in runs on one window, and that check is a few attribute reads
instead of two bisects that miss the CPU caches at a million windows.
"""

from __future__ import annotations

from collections.abc import Iterator

from sortedcontainers import SortedDict

from devmodel.leases.window import Window


class WindowTable:
    """Non-overlapping windows keyed by start offset."""

    __slots__ = ("_by_start", "_last")

    def __init__(self) -> None:
        self._by_start: SortedDict[int, Window] = SortedDict()
        # Always a window in the table, or None: remove() forgets it.
        self._last: Window | None = None

    def __len__(self) -> int:
        return len(self._by_start)

    def __iter__(self) -> Iterator[Window]:
        return iter(self._by_start.values())

    def find(self, offset: int) -> Window | None:
        """The window containing `offset`, if any."""
        w = self._last
        if w is not None and w.start <= offset < w.start + w.length:
            return w
        d = self._by_start
        start = next(d.irange(maximum=offset, reverse=True), None)
        if start is None:
            return None
        w = d[start]
        if offset < start + w.length:
            self._last = w
            return w
        return None

    def overlapping(self, start: int, end: int) -> list[Window]:
        """Windows that intersect [start, end), in order."""
        if end <= start:
            return []
        d = self._by_start
        found = []
        before = next(d.irange(maximum=start, reverse=True), None)
        if before is not None:
            w = d[before]
            if before + w.length > start:
                found.append(w)
        # Keys above `start` only: a window starting at `start` itself was `before`.
        found.extend(d[k] for k in d.irange(start, end, inclusive=(False, False)))
        return found

    def add(self, window: Window) -> None:
        last = self._last
        if last is not None and last.start == window.start:
            self._last = None  # replaced without remove(): never answer from the old one
        self._by_start[window.start] = window

    def remove(self, window: Window) -> None:
        if self._by_start.get(window.start) is window:
            del self._by_start[window.start]
        if self._last is window:
            self._last = None
