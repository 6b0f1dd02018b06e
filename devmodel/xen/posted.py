"""Posted writes: the buffered ioreq ring, performed in the order Xen queued them.

Xen posts only VGA writes and TIMEOFFSET on this ring (BUFIOREQ_MODE says why the ring exists
at all). A vCPU request that arrives after some posted writes must not overtake them, as in
QEMU: the dispatcher notes how many were queued when it took the request (`queued`) and the
vCPU's worker waits in `through` until that many are done.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from devmodel.counters import DeviceCounters
from devmodel.ratelimit import RateLimitedLogger
from devmodel_wire.xen import BufferedRing, BufferedWrite, IoreqType, XenAbiError, ring_pointers

__all__ = ["PostedWrites"]

_READ_POINTER: Final = struct.Struct("<I")

WriteFn = Callable[[int, int, int], Awaitable[None]]
"""(guest address, size, value): one MMIO write."""


class PostedWrites:
    """The buffered ring's consumer: drained by the dispatcher, performed by `run`."""

    def __init__(
        self,
        page: memoryview | None,
        counters: DeviceCounters,
        write: WriteFn,
        log: RateLimitedLogger,
    ) -> None:
        self.page = page
        self.counters = counters
        self.ring = BufferedRing()
        self.queued = 0
        self.done = 0
        self._write = write
        self._log = log
        self._pending: list[BufferedWrite] = []
        self._wake = trio.Event()
        self._progress = trio.Event()

    def drain(self) -> None:
        """Take every write Xen queued so far off the ring (without waiting)."""
        page = self.page
        if page is None:
            return
        try:
            writes = self.ring.drain(page)
        except XenAbiError as exc:
            # Only Xen writes the ring; if it cannot be parsed nothing in it can be trusted.
            # Skip to the write pointer so the ring keeps flowing (the entries are lost).
            self.counters.protocol_errors += 1
            self._log.warning("buffered ring skipped: %s", exc)
            _rd, wr = ring_pointers(page)
            _READ_POINTER.pack_into(page, 0, wr)
            return
        if writes:
            self._pending.extend(writes)
            self.queued += len(writes)
            self._wake.set()

    async def through(self, target: int) -> None:
        """Wait until the first `target` posted writes are done."""
        while self.done < target:
            await self._progress.wait()

    async def run(self) -> None:
        """Performs posted writes one after another, in the order Xen queued them."""
        while True:
            if not self._pending:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            w = self._pending.pop(0)
            if w.type == IoreqType.COPY:
                await self._write(w.addr, w.size, w.data)
            elif w.type == IoreqType.PIO:
                self.counters.bad_accesses += 1
                self._log.warning("posted port write at %#x; none is claimed", w.addr)
            # TIMEOFFSET (broadcast to every server): nothing here keeps the guest's time.
            self.done += 1
            progress, self._progress = self._progress, trio.Event()
            progress.set()
