"""The reference lender's pure bookkeeping: VRAM heaps with a budget, and an LRU order.

Kept apart from reference_lender.py, which does all the I/O, so that the rules that decide
where a buffer lives and which one is evicted next can be read (and tested) without sockets,
memfds or trio. Nothing here knows about guests or the lease protocol: a heap hands out
aligned extents, the LRU orders whatever keys it is given.
"""

from __future__ import annotations

import bisect
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

PAGE = 4096


@dataclass(frozen=True, slots=True)
class Extent:
    """Where a buffer lives: `length` bytes at `offset` of heap number `heap`."""

    heap: int
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


class Heap:
    """The free space of one heap (one memfd), as sorted, coalesced [start, end) extents.

    First fit with alignment: lenders must hand out granule-aligned fd offsets so that the
    borrower (and on Xen the hypervisor) can map a lease with huge pages.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)] if size else []

    @property
    def free_bytes(self) -> int:
        return sum(end - start for start, end in self._free)

    def holes(self) -> list[tuple[int, int]]:
        return list(self._free)

    def alloc(self, length: int, align: int, *, avoid: int | None = None) -> int | None:
        """The lowest aligned offset with `length` free bytes (not `avoid`), taken; or None."""
        for start, end in self._free:
            offset = -(-start // align) * align
            while offset + length <= end:
                if offset != avoid:
                    self._take(offset, length)
                    return offset
                offset += align
        return None

    def alloc_at(self, offset: int, length: int) -> bool:
        """Take exactly [offset, offset + length) if it is free."""
        i = bisect.bisect_right(self._free, (offset, self.size + 1)) - 1
        if i < 0:
            return False
        start, end = self._free[i]
        if start <= offset and offset + length <= end:
            self._take(offset, length)
            return True
        return False

    def free(self, offset: int, length: int) -> None:
        end = offset + length
        if length <= 0 or offset < 0 or end > self.size:
            raise ValueError(f"extent {offset:#x}+{length:#x} is not inside the heap")
        i = bisect.bisect_left(self._free, (offset, offset))
        if (i > 0 and self._free[i - 1][1] > offset) or (
            i < len(self._free) and self._free[i][0] < end
        ):
            raise ValueError(f"extent {offset:#x}+{length:#x} is already free (double free)")
        # Coalesce with the neighbours so that big extents become available again.
        if i < len(self._free) and self._free[i][0] == end:
            end = self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][1] == offset:
            offset = self._free.pop(i - 1)[0]
            i -= 1
        self._free.insert(i, (offset, end))

    def _take(self, offset: int, length: int) -> None:
        i = bisect.bisect_right(self._free, (offset, self.size + 1)) - 1
        start, end = self._free[i]
        assert start <= offset and offset + length <= end
        pieces = [(s, e) for s, e in ((start, offset), (offset + length, end)) if s < e]
        self._free[i : i + 1] = pieces


class Vram:
    """The budget: `budget` bytes cut into `heaps` equal heaps, each one memfd in the lender.

    Several heaps exist so that a page-in can move a buffer to another memfd, which is what a
    real GPU memory manager does and what the borrower must follow.
    """

    def __init__(self, budget: int, heaps: int = 4, align: int = PAGE) -> None:
        if heaps < 1:
            raise ValueError("at least one heap")
        size = budget // heaps // align * align
        if size <= 0:
            raise ValueError(f"a budget of {budget} bytes cannot make {heaps} heaps")
        self.heap_size = size
        self.heaps = [Heap(size) for _ in range(heaps)]
        self.capacity = size * heaps
        self.used = 0
        self.peak = 0

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used

    def allocate(
        self,
        length: int,
        align: int,
        rng: random.Random,
        *,
        home: Extent | None = None,
        move: bool = False,
    ) -> Extent | None:
        """Room for a buffer: back at `home` if that is free and no move is wanted, else
        somewhere else (another heap first when moving), or None when nothing fits."""
        if length > self.heap_size:
            return None
        if home is not None and not move and self.heaps[home.heap].alloc_at(home.offset, length):
            return self._note(Extent(home.heap, home.offset, length))
        order = list(range(len(self.heaps)))
        rng.shuffle(order)
        if home is not None and move:
            # Other memfds first; the old one last, and never at the very same offset.
            order.remove(home.heap)
            order.append(home.heap)
        for index in order:
            avoid = home.offset if home is not None and move and index == home.heap else None
            offset = self.heaps[index].alloc(length, align, avoid=avoid)
            if offset is not None:
                return self._note(Extent(index, offset, length))
        if home is not None and move and self.heaps[home.heap].alloc_at(home.offset, length):
            # Home is the only room left: a move is not worth evicting another buffer for.
            return self._note(Extent(home.heap, home.offset, length))
        return None

    def release(self, extent: Extent) -> None:
        self.heaps[extent.heap].free(extent.offset, extent.length)
        self.used -= extent.length

    def _note(self, extent: Extent) -> Extent:
        self.used += extent.length
        self.peak = max(self.peak, self.used)
        return extent


K = TypeVar("K")


class Lru(Generic[K]):
    """Least recently used first. The lender sees no guest accesses (they go to the device
    model), so "use" means granted or paged in: the buffer the guest asked for last is the
    one kept longest."""

    def __init__(self) -> None:
        self._order: OrderedDict[K, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._order))

    def touch(self, key: K) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def discard(self, key: K) -> None:
        self._order.pop(key, None)

    def oldest(self, eligible: Callable[[K], bool] = lambda _: True) -> K | None:
        for key in self._order:
            if eligible(key):
                return key
        return None
