"""BAR0's backing store: the lent-memory aperture as the transports see it.

Every transport reaches BAR0 through the `Aperture` protocol only, so that the memory the device
model owns today and the lease engine of tomorrow (where an access may wait for a page-in) are
interchangeable. The calls are async for that reason; an implementation that never waits
returns without suspending, which costs a transport a fraction of a microsecond.

Validation of the access shape (size, alignment, range) happens before these calls, in the PCI
function, so implementations may assume `0 <= offset`, `offset + size <= self.size` and that
the access does not cross a naturally aligned boundary of its size.
"""

from __future__ import annotations

import mmap
from typing import Protocol

MIN_APERTURE = 1 << 20
MAX_APERTURE = 1 << 40
GRANULES = (4 << 10, 2 << 20, 1 << 30)
# Linux value; the stdlib has the constant but typeshed does not declare it yet.
MAP_NORESERVE: int = getattr(mmap, "MAP_NORESERVE", 0x4000)
DEFAULT_GRANULE = 2 << 20


class Aperture(Protocol):
    @property
    def size(self) -> int: ...

    @property
    def granule(self) -> int: ...

    async def read(self, offset: int, size: int) -> bytes: ...

    # Optional: `read_now(offset, size) -> bytes | None`, the same read done synchronously, or
    # None when it would have to wait (then the caller awaits `read`). The PCI function uses
    # it when the aperture has it: a coroutine that never suspends still costs its frame.

    async def write(self, offset: int, data: bytes) -> None: ...

    # Optional: `write_now(offset, data) -> bool`, the same write done synchronously (True), or
    # False, having done nothing, when it would have to wait (then the caller awaits `write`).

    def reset(self) -> None:
        """Device reset: the guest-visible contents of the aperture may be discarded."""

    def close(self) -> None: ...


def check_aperture_size(size: int) -> None:
    """Raise ValueError unless `size` is a power of two BAR0 can have."""
    if size < MIN_APERTURE or size > MAX_APERTURE or size & (size - 1):
        raise ValueError(f"aperture size must be a power of two from 1M to 1T, not {size:#x}")


class OwnedMemory:
    """An aperture backed by anonymous memory the device model owns (no lender yet).

    MAP_NORESERVE keeps a 64 GiB aperture cheap: pages exist only once the guest writes them,
    and reads of untouched pages share the kernel's zero page.
    """

    __slots__ = ("_granule", "_mm", "_size", "_view")

    def __init__(self, size: int, granule: int = DEFAULT_GRANULE) -> None:
        check_aperture_size(size)
        if granule not in GRANULES or granule > size:
            raise ValueError("granule must be one of 4K, 2M, 1G and at most the aperture size")
        self._size = size
        self._granule = granule
        self._mm = mmap.mmap(
            -1,
            size,
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        self._view = memoryview(self._mm)

    @property
    def size(self) -> int:
        return self._size

    @property
    def granule(self) -> int:
        return self._granule

    async def read(self, offset: int, size: int) -> bytes:
        return self._mm[offset : offset + size]

    def read_now(self, offset: int, size: int) -> bytes:
        return self._mm[offset : offset + size]

    async def write(self, offset: int, data: bytes) -> None:
        self._view[offset : offset + len(data)] = data

    def write_now(self, offset: int, data: bytes) -> bool:
        self._view[offset : offset + len(data)] = data
        return True

    def reset(self) -> None:
        # Dropping the pages returns them to the kernel and makes them read as zero again.
        self._mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._view.release()
        self._mm.close()
