"""The dispatch loop and one worker per vCPU: Xen's concurrency rule for ioreqs.

Each vCPU has its own slot in the shared ioreq page and its own event channel, and stays
blocked until its slot is answered. The dispatcher reads which ports fired and looks at each
vCPU's slot. A request that cannot block (a config cycle, port I/O, INVALIDATE, a BAR2
register, BAR0 where its window is resident: `IoreqHandler.serve_now`) is answered there and
then, without waking any task: the slot is read with one `unpack_from` and answered with two
stores and the notification. Only a request that may have to wait (a fault, a page-in, a rep)
is claimed (READY -> INPROCESS) and handed to that vCPU's worker, which serves it and answers.
So a vCPU whose access waits for a page-in never holds up another (shared/DESIGN.md,
"Concurrency"), and every slot is always answered, all-ones on a forced stop, so no vCPU is
left blocked.

Posted writes Xen queued before a synchronous request are performed before it (as QEMU does):
the dispatcher drains the ring first, and answers in place only when no earlier posted write
is still waiting for the `run` task (posted.py); otherwise the request goes to the worker,
which waits for them.

The dispatcher reads ports until none is pending, and a busy guest (a vCPU on another CPU
that issues its next access as soon as the last is answered, or posted writes, which notify
the buffered port again as soon as it is unmasked) could keep it reading forever, with the
workers, the posted-write task, the lender link and every deadline starved. A time slice
(devmodel/fairness.py) makes it yield at least every millisecond of continuous work: one
clock read per port.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from time import perf_counter_ns
from typing import Final

import trio

from devmodel.fairness import TimeSlice
from devmodel.ratelimit import RateLimitedLogger
from devmodel.xen.platform import XenError, XenPlatform
from devmodel.xen.posted import PostedWrites
from devmodel.xen.request import LATER, Later, ones
from devmodel_wire.xen import (
    FLAG_DATA_IS_PTR,
    FLAG_DIR_READ,
    FLAG_STATE,
    IOREQ,
    IOREQ_SIZE,
    IoReq,
    IoreqState,
    IoreqType,
    XenAbiError,
    answer_slot,
    complete_slot,
    decode_ioreq,
    set_slot_state,
)

__all__ = ["VcpuWorkers"]

ServeFn = Callable[[IoReq], Awaitable[int | None]]
ServeNowFn = Callable[[IoReq], int | Later | None]
MmioNowFn = Callable[[int, int, bool, int], int | Later | None]

# Plain ints for the hot path's tests (an IntEnum member read off its class costs more).
_READY: Final = int(IoreqState.READY)
_COPY: Final = int(IoreqType.COPY)
_VALUE_SIZES: Final = frozenset((1, 2, 4, 8))


def _later(req: IoReq) -> Later:
    """The `serve_now` of a dispatcher built without one: every request goes to a worker."""
    return LATER


def _mmio_later(addr: int, size: int, is_read: bool, value: int) -> Later:
    return LATER


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
        serve_now: ServeNowFn = _later,
        mmio_now: MmioNowFn = _mmio_later,
        follow_up: Callable[[], None] | None = None,
    ) -> None:
        self.platform = platform
        self.ioreq = ioreq
        self.vcpu_port = vcpu_port
        self.port_vcpu = {port: vcpu for vcpu, port in enumerate(vcpu_port)}
        self.buf_port = buf_port
        self.posted = posted
        self.serve = serve
        self.serve_now = serve_now
        self.mmio_now = mmio_now
        # What an access put off until its vCPU has the answer (DeviceBackend.follow_up).
        self.follow_up = follow_up
        self.served = 0
        self.handed = 0
        """Requests handed to a worker (the rest were answered in the dispatcher)."""
        self.stopped = False
        vcpus = len(vcpu_port)
        self.busy = [False] * vcpus
        self._requests: list[IoReq | None] = [None] * vcpus
        self._posted_before = [0] * vcpus  # per vCPU: posted writes to finish first
        self._lots = [trio.lowlevel.ParkingLot() for _ in range(vcpus)]
        self._log = log
        self.slice = TimeSlice()

    def start_workers(self, nursery: trio.Nursery) -> None:
        for vcpu in range(len(self.vcpu_port)):
            nursery.start_soon(self._worker, vcpu)

    async def dispatch(self) -> None:
        """Wait for event channel notifications and serve each vCPU's request or the ring."""
        p = self.platform
        fd = p.evtchn_fd()
        port_vcpu = self.port_vcpu
        fair = self.slice
        clock = perf_counter_ns
        while True:
            await trio.lowlevel.wait_readable(fd)
            fair.restart()
            while True:
                if clock() >= fair.deadline:
                    await fair.yield_now()
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
        """Serve vCPU `vcpu`'s slot if it holds a new request: here if it cannot block, else
        claim it and wake the vCPU's worker."""
        if self.busy[vcpu]:
            return  # its worker is still on the last request; Xen would not send another
        page = self.ioreq
        at = vcpu * IOREQ_SIZE
        try:
            addr, data, count, size, _port, _pad, flags, kind = IOREQ.unpack_from(page, at)
        except struct.error:
            self._log.warning("vCPU %d: its slot is beyond the %d-byte page", vcpu, len(page))
            return
        if flags & FLAG_STATE != _READY:
            return  # a spurious or repeated notification
        posted = self.posted
        # Posted writes Xen queued before this request are performed before it (as QEMU does).
        if self.buf_port is not None:
            posted.drain()
        req: IoReq | None = None
        if posted.done == posted.queued:  # none of them is left waiting for `run`
            if (
                kind == _COPY
                and count == 1
                and not flags & FLAG_DATA_IS_PTR
                and size in _VALUE_SIZES
            ):  # the hot case, a single access with its data inline: no IoReq built
                answer = self.mmio_now(addr, size, bool(flags & FLAG_DIR_READ), data)
            else:
                req = decode_ioreq(page, at)
                answer = self.serve_now(req)
            if answer is not LATER:
                self._answer_now(vcpu, at, flags, answer)
                return
        # As Xen wrote it (state READY); decoded once, whichever way it came here.
        self._requests[vcpu] = req if req is not None else decode_ioreq(page, at)
        set_slot_state(page, vcpu, IoreqState.INPROCESS)
        self._posted_before[vcpu] = posted.queued
        self.busy[vcpu] = True
        self.handed += 1
        self._lots[vcpu].unpark()

    def _answer_now(self, vcpu: int, at: int, flags: int, data: int | None) -> None:
        try:
            answer_slot(self.ioreq, at, flags, data)
            self.platform.evtchn_notify(self.vcpu_port[vcpu])
        except (XenAbiError, XenError, struct.error) as exc:
            self._log.warning("vCPU %d: cannot answer: %s", vcpu, exc)
        self.served += 1

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
            if self.follow_up is not None:
                self.follow_up()

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
