"""Posted writes: the buffered ioreq ring, performed in the order Xen queued them.

Xen posts only VGA writes and TIMEOFFSET on this ring (BUFIOREQ_MODE says why the ring exists
at all). A vCPU request that arrives after some posted writes must not overtake them, as in
QEMU: the dispatcher notes how many were queued when it took the request (`queued`) and the
vCPU's worker waits in `through` until that many are done.

Where a write is performed: the dispatcher drains the ring and performs the writes in place,
in order, as long as each needs no wait (`write_now`: a resident window, a register), so a
stream of posted writes wakes no task. The first write that may wait (a fault) and every write
after it go to the `run` task, which awaits them one after another; while it holds one, the
dispatcher performs none, so the order stays the ring's.
"""

from __future__ import annotations

import struct
from collections import deque
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
WriteNowFn = Callable[[int, int, int], bool]
"""The same write if it needs no wait: True once done, False (nothing done) to await it."""


def _never_now(addr: int, size: int, value: int) -> bool:
    return False


class PostedWrites:
    """The buffered ring's consumer: drained by the dispatcher, performed in place or by `run`."""

    def __init__(
        self,
        page: memoryview | None,
        counters: DeviceCounters,
        write: WriteFn,
        log: RateLimitedLogger,
        write_now: WriteNowFn = _never_now,
    ) -> None:
        self.page = page
        self.counters = counters
        self.ring = BufferedRing()
        self.queued = 0
        self.done = 0
        self._write = write
        self._write_now = write_now
        self._log = log
        self._pending: deque[BufferedWrite] = deque()
        self._running = False  # `run` holds a write: only it may perform the next ones
        self._watchers = 0  # tasks waiting in `through`
        self._wake = trio.Event()
        self._progress = trio.Event()

    def drain(self) -> None:
        """Take every write Xen queued so far off the ring and perform those that need no
        wait, in order (without waiting)."""
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
            self._perform_now()

    def _perform_now(self) -> None:
        """Perform queued writes here while each needs no wait; hand the rest to `run`."""
        if self._running:
            return  # `run` is on an earlier write: the later ones wait for it, in order
        pending = self._pending
        before = self.done
        while pending:
            w = pending[0]
            if w.type == IoreqType.COPY and not self._write_now(w.addr, w.size, w.data):
                self._wake.set()  # this one may wait: `run` takes it, and what follows
                break
            pending.popleft()
            if w.type != IoreqType.COPY:
                self._other(w)
            self.done += 1
        if self.done != before and self._watchers:
            self._progressed()

    def _other(self, w: BufferedWrite) -> None:
        if w.type == IoreqType.PIO:
            self.counters.bad_accesses += 1
            self._log.warning("posted port write at %#x; none is claimed", w.addr)
        # TIMEOFFSET (broadcast to every server): nothing here keeps the guest's time.

    def _progressed(self) -> None:
        progress, self._progress = self._progress, trio.Event()
        progress.set()

    async def through(self, target: int) -> None:
        """Wait until the first `target` posted writes are done."""
        self._watchers += 1
        try:
            while self.done < target:
                await self._progress.wait()
        finally:
            self._watchers -= 1

    async def run(self) -> None:
        """Performs the posted writes that may wait, one after another, in the ring's order."""
        pending = self._pending
        while True:
            if not pending:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            w = pending.popleft()
            self._running = True
            try:
                if w.type == IoreqType.COPY:
                    await self._write(w.addr, w.size, w.data)
                else:
                    self._other(w)
            finally:
                self._running = False
            self.done += 1
            self._progressed()
