"""The dispatch loop and one worker per vCPU: Xen's concurrency rule for ioreqs.

Each vCPU has its own slot in the shared ioreq page and its own event channel, and stays
blocked until its slot is answered. The dispatcher reads which ports fired, claims each new
request (READY -> INPROCESS) and wakes that vCPU's worker, which serves it and answers. So a
vCPU whose access waits for a page-in never holds up another (shared/DESIGN.md, "Concurrency"),
and every slot is always answered, all-ones on a forced stop, so no vCPU is left blocked.

The dispatcher reads ports until none is pending, and a busy guest (posted writes notify the
buffered port again as soon as it is unmasked) could keep it reading forever, with the workers
it wakes, the posted-write task, the lender link and every deadline starved. A time slice
(devmodel/fairness.py) makes it yield at least every millisecond of continuous work.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from devmodel.fairness import TimeSlice
from devmodel.ratelimit import RateLimitedLogger
from devmodel.xen.platform import XenError, XenPlatform
from devmodel.xen.posted import PostedWrites
from devmodel.xen.request import ones
from devmodel_wire.xen import (
    IoReq,
    IoreqState,
    XenAbiError,
    complete_slot,
    read_slot,
    set_slot_state,
)

__all__ = ["VcpuWorkers"]

ServeFn = Callable[[IoReq], Awaitable[int | None]]


class VcpuWorkers:
    """The event-channel dispatcher and the per-vCPU workers over one ioreq page."""

    def __init__(
        self,
        platform: XenPlatform,
        ioreq: memoryview | bytearray,
        vcpu_port: list[int],
        buf_port: int | None,
        posted: PostedWrites,
        serve: ServeFn,
        log: RateLimitedLogger,
    ) -> None:
        self.platform = platform
        self.ioreq = ioreq
        self.vcpu_port = vcpu_port
        self.port_vcpu = {port: vcpu for vcpu, port in enumerate(vcpu_port)}
        self.buf_port = buf_port
        self.posted = posted
        self.serve = serve
        self.served = 0
        self.stopped = False
        vcpus = len(vcpu_port)
        self.busy = [False] * vcpus
        self._requests: list[IoReq | None] = [None] * vcpus
        self._posted_before = [0] * vcpus  # per vCPU: posted writes to finish first
        self._lots = [trio.lowlevel.ParkingLot() for _ in range(vcpus)]
        self._log = log

    def start_workers(self, nursery: trio.Nursery) -> None:
        for vcpu in range(len(self.vcpu_port)):
            nursery.start_soon(self._worker, vcpu)

    async def dispatch(self) -> None:
        """Wait for event channel notifications and hand each to its vCPU or the ring."""
        p = self.platform
        fd = p.evtchn_fd()
        port_vcpu = self.port_vcpu
        fair = TimeSlice()
        while True:
            await trio.lowlevel.wait_readable(fd)
            fair.restart()
            while True:
                await fair.maybe_yield()
                port = p.evtchn_pending()
                if port is None:
                    break
                p.evtchn_unmask(port)
                vcpu = port_vcpu.get(port)
                if vcpu is not None:
                    self._take(vcpu)
                elif port == self.buf_port:
                    self.posted.drain()
                else:
                    self._log.warning("event on unknown port %d", port)

    def _take(self, vcpu: int) -> None:
        """Claim vCPU `vcpu`'s slot if it holds a new request, and wake its worker."""
        if self.busy[vcpu]:
            return  # its worker is still on the last request; Xen would not send another
        page = self.ioreq
        try:
            req = read_slot(page, vcpu)
        except XenAbiError as exc:
            self._log.warning("vCPU %d: %s", vcpu, exc)
            return
        if req.state != IoreqState.READY:
            return  # a spurious or repeated notification
        set_slot_state(page, vcpu, IoreqState.INPROCESS)
        # Posted writes Xen queued before this request are performed before it (as QEMU does).
        if self.buf_port is not None:
            self.posted.drain()
        self._requests[vcpu] = req
        self._posted_before[vcpu] = self.posted.queued
        self.busy[vcpu] = True
        self._lots[vcpu].unpark()

    async def _worker(self, vcpu: int) -> None:
        lot = self._lots[vcpu]
        posted = self.posted
        while True:
            await lot.park()
            req = self._requests[vcpu]
            assert req is not None
            data: int | None = None
            try:
                if posted.done < self._posted_before[vcpu]:
                    await posted.through(self._posted_before[vcpu])
                data = await self.serve(req)
            except trio.Cancelled:
                # Stopping: answer (all-ones) so the vCPU is not left blocked on a dead server.
                self._answer(vcpu, ones(req.size) if req.is_read else None)
                raise
            self._answer(vcpu, data)

    def _answer(self, vcpu: int, data: int | None) -> None:
        if self.stopped or not self.busy[vcpu]:
            return
        try:
            complete_slot(self.ioreq, vcpu, data)
            self.platform.evtchn_notify(self.vcpu_port[vcpu])
        except (XenAbiError, XenError) as exc:
            self._log.warning("vCPU %d: cannot answer: %s", vcpu, exc)
        self._requests[vcpu] = None
        self.busy[vcpu] = False
        self.served += 1
