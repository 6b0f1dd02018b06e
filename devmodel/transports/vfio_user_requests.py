"""vfio-user requests answered by the device backend: events in, reply events out, no socket.

Everything about a vfio-user session that is specific to vfio-user but not to its socket lives
here: the in-order processing of what the protocol object decoded, version negotiation, the DMA
map table, device/region/IRQ info, SET_IRQS and reset. The transport loop
(devmodel/transports/vfio_user.py) only moves bytes and fds between its socket and the
`ServerConnection`; tests feed the connection bytes (or call a handler with an event) and read
the replies back, with no socketpair.

The hot path (REGION_READ/WRITE of a BAR) stays inline in `process`. A plain read is taken
straight from the connection's buffer (`next_read`, no event) and tried synchronously on its
region (`read_now`: a resident window of BAR0, or a BAR2 register); its reply is packed at
once. Only a read that must wait (a fault, a revoke in progress) or be refused takes the
general way: its event, one bus lookup, one await.
`process` also keeps the loop fair: a client that streams requests (posted writes need no
reply, so nothing ever makes it wait) gets a time slice (devmodel/fairness.py), after which
`process` yields to trio between two requests, so that the lender link, the control socket and
every deadline still run.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from time import perf_counter_ns
from typing import Any

from devmodel.backend.device import DeviceBackend
from devmodel.counters import DeviceCounters
from devmodel.dma import DmaError, DmaRegion, DmaTable
from devmodel.fairness import TimeSlice
from devmodel.pci.errors import AccessError
from devmodel.ratelimit import RateLimitedLogger
from pyvfio_user import constants as c
from pyvfio_user import events as ev
from pyvfio_user.connection import SERVER_DEFAULT_CAPS, ServerConnection
from pyvfio_user.constants import Command
from pyvfio_user.sansio import CLOSED, NEED_DATA, Outgoing
from pyvfio_user.version import Capabilities

__all__ = ["VfioUserRequests"]

# Outgoing from (data, fds) in one C call (the NamedTuple's own __new__ is Python code).
_outgoing = tuple.__new__

log = logging.getLogger("devmodel.vfio_user")

Access = ev.RegionRead | ev.RegionWrite | ev.RegionWriteMulti


class VfioUserRequests:
    """One client's requests: the protocol object, its DMA maps, and the replies to send."""

    __slots__ = (
        "_bad_log",
        "_handlers",
        "backend",
        "conn",
        "counters",
        "current",
        "dma",
        "on_set_irqs",
        "out",
        "slice",
    )

    def __init__(
        self,
        backend: DeviceBackend,
        capabilities: Capabilities = SERVER_DEFAULT_CAPS,
        bad_log: RateLimitedLogger | None = None,
    ) -> None:
        self.backend = backend
        self.counters: DeviceCounters = backend.counters
        self.conn = ServerConnection(capabilities)
        self.dma = DmaTable(capabilities.max_dma_maps)
        # Replies encoded and not sent yet, in order; the transport sends and clears them.
        self.out: list[Outgoing] = []
        # The access being served while an await is pending: answered on a forced stop.
        self.current: Access | None = None
        # How long `process` may run before it yields; the transport restarts it after a wait.
        self.slice = TimeSlice()
        self._bad_log = bad_log or RateLimitedLogger(log)
        # Called with the index after every SET_IRQS applied (the INTx unmask eventfd watcher).
        self.on_set_irqs: Callable[[int], None] | None = None
        self._handlers: dict[type, Callable[[Any], Any]] = {
            ev.VersionRequest: self.version,
            ev.DmaMap: self.dma_map,
            ev.DmaUnmap: self.dma_unmap,
            ev.DeviceGetInfo: self.device_info,
            ev.DeviceGetRegionInfo: self.region_info,
            ev.DeviceGetRegionIoFds: self.unsupported,
            ev.DeviceGetIrqInfo: self.irq_info,
            ev.DeviceSetIrqs: self.set_irqs,
            ev.DeviceReset: self.reset,
            ev.DeviceFeature: self.unsupported,
            ev.MigDataRead: self.unsupported,
            ev.MigDataWrite: self.unsupported,
            ev.BadRequest: self.bad_request,
        }

    def close(self) -> None:
        self.conn.close()
        self.dma.clear()
        # The eventfds belong to this client; a new client sets up its own.
        self.backend.irqs.close()

    # ------------------------------------------------------------------ in order

    async def process(self) -> bool:
        """Answer every complete request the connection holds, in order, into `out`.

        False once the client closed (whatever was answered before is still in `out`).
        Yields to trio between two requests once its time slice is used up (Cancelled there
        when the server stops, with no request half served).
        """
        conn = self.conn
        lookup = self.backend.lookup
        out = self.out
        fair = self.slice
        next_read = conn.next_read
        read_reply = conn.read_reply
        while True:
            if perf_counter_ns() >= fair.deadline:
                await fair.yield_now()
            # The trapped read of resident memory: no event, no coroutine, no bookkeeping.
            taken = next_read()
            if taken is NEED_DATA:  # what next_event would say; mypy cannot narrow on `is`
                return True
            if taken is not None:
                msg_id, offset, index, count = taken  # type: ignore[misc, str-unpack]
                data = lookup(index).read_now(offset, count)
                if data is not None:
                    out.append(_outgoing(Outgoing, (read_reply(msg_id, offset, index, data), ())))
                    continue
                await self._read(conn.owe_read(msg_id, offset, index, count))
                continue
            # Dispatch on the exact type with `is` (cheaper than isinstance chains on the hot
            # path); mypy cannot narrow through `kind`, hence Any.
            event: Any = conn.next_event()
            kind = type(event)
            # The hot path, inline: trapped reads and posted writes on a BAR.
            if kind is ev.RegionRead:
                await self._read(event)
            elif kind is ev.RegionWrite:
                self.current = event
                refused = await self._write(event.region, event.offset, event.data)
                if not event.no_reply:
                    if refused is None:
                        reply: Any = ev.RegionWriteReply(
                            event.msg_id, event.offset, event.region, len(event.data)
                        )
                    else:
                        reply = ev.ErrorReply(event.msg_id, kind.command, refused)
                    out.append(conn.send(reply))
                self.current = None
            elif event is NEED_DATA:
                return True
            elif event is CLOSED:
                return False
            elif kind is ev.RegionWriteMulti:
                self.current = event
                done = 0
                for w in event.writes:
                    if await self._write(w.region, w.offset, w.data) is None:
                        done += 1
                if not event.no_reply:
                    out.append(conn.send(ev.RegionWriteMultiReply(event.msg_id, done)))
                self.current = None
            else:
                reply = self.handle(event)
                if reply is not None and not getattr(event, "no_reply", False):
                    out.append(conn.send(reply))

    async def _read(self, event: ev.RegionRead) -> None:
        """Serve one read the general way (it may wait, or be refused) and queue its reply."""
        self.current = event
        conn = self.conn
        try:
            data = await self.backend.lookup(event.region).read(event.offset, event.count)
        except AccessError as exc:
            self._refused("read", event.region, event.offset, exc)
            reply: Any = ev.ErrorReply(event.msg_id, Command.REGION_READ, exc.errno)
        else:
            self.current = None
            encoded = conn.read_reply_owed(event.msg_id, event.offset, event.region, data)
            self.out.append(_outgoing(Outgoing, (encoded, ())))
            return
        self.current = None
        self.out.append(conn.send(reply))

    def fail_current(self) -> None:
        """Answer the access being served with EIO (a forced stop interrupted it)."""
        current, self.current = self.current, None
        if current is not None and not getattr(current, "no_reply", False):
            reply = ev.ErrorReply(current.msg_id, type(current).command, errno.EIO)
            self.out.append(self.conn.send(reply))

    async def _write(self, region: int, offset: int, data: bytes) -> int | None:
        """Apply one write; None when done, else the errno it was refused with."""
        try:
            await self.backend.lookup(region).write(offset, data)
        except AccessError as exc:
            self._refused("write", region, offset, exc)
            return exc.errno
        return None

    def _refused(self, what: str, region: int, offset: int, exc: AccessError) -> None:
        self._bad_log.warning("refused %s of region %d at %#x: %s", what, region, offset, exc)

    # ------------------------------------------------------------------ cold requests

    def handle(self, event: Any) -> Any:
        """The reply event to a request that is not a region access (None: no reply)."""
        return self._handlers[type(event)](event)

    def version(self, e: ev.VersionRequest) -> ev.VersionReply | ev.ErrorReply:
        reply = self.conn.version_reply(e)
        if isinstance(reply, ev.VersionReply):
            log.info("negotiated vfio-user %d.%d with %s", reply.major, reply.minor, e.capabilities)
        else:
            log.warning("refused client version %d.%d", e.major, e.minor)
        return reply

    def dma_map(self, e: ev.DmaMap) -> ev.Ack | ev.ErrorReply:
        region = DmaRegion(e.address, e.size, e.offset, e.flags, e.fd)
        region.overlaps_bar = self.backend.overlapping_bar(e.address, e.size) is not None
        if region.overlaps_bar:
            log.warning(
                "client maps DMA at %#x+%#x over a BAR of ours: recorded, never used",
                e.address,
                e.size,
            )
        try:
            self.dma.add(region)
        except DmaError as exc:
            if e.fd is not None:
                os.close(e.fd)
            return ev.ErrorReply(e.msg_id, Command.DMA_MAP, exc.errno)
        return ev.Ack(e.msg_id, Command.DMA_MAP)

    def dma_unmap(self, e: ev.DmaUnmap) -> ev.DmaUnmapReply | ev.ErrorReply:
        if e.flags & c.DMA_UNMAP_ALL:
            self.dma.clear()
        else:
            try:
                self.dma.remove(e.address, e.size)
            except DmaError as exc:
                return ev.ErrorReply(e.msg_id, Command.DMA_UNMAP, exc.errno)
        return ev.DmaUnmapReply(e.msg_id, e.flags, e.address, e.size, e.argsz)

    def device_info(self, e: ev.DeviceGetInfo) -> ev.DeviceInfo:
        return ev.DeviceInfo(
            e.msg_id, c.DEVICE_FLAGS_RESET | c.DEVICE_FLAGS_PCI, c.PCI_NUM_REGIONS, c.PCI_NUM_IRQS
        )

    def region_info(self, e: ev.DeviceGetRegionInfo) -> ev.RegionInfo | ev.ErrorReply:
        size = self.backend.region_size(e.index)
        if size is None:
            return ev.ErrorReply(e.msg_id, Command.DEVICE_GET_REGION_INFO, errno.EINVAL)
        flags = c.REGION_INFO_FLAG_READ | c.REGION_INFO_FLAG_WRITE if size else 0
        return ev.RegionInfo(e.msg_id, e.index, flags, size, 0, argsz=e.argsz)

    def irq_info(self, e: ev.DeviceGetIrqInfo) -> ev.IrqInfo | ev.ErrorReply:
        if e.index >= c.PCI_NUM_IRQS:
            return ev.ErrorReply(e.msg_id, Command.DEVICE_GET_IRQ_INFO, errno.EINVAL)
        flags, count = self.backend.irqs.info(e.index)
        return ev.IrqInfo(e.msg_id, e.index, flags, count)

    def set_irqs(self, e: ev.DeviceSetIrqs) -> ev.Ack | ev.ErrorReply:
        try:
            self.backend.irqs.set_irqs(e.flags, e.index, e.start, e.count, e.data, list(e.fds))
        except AccessError as exc:
            log.warning("refused SET_IRQS: %s", exc)
            return ev.ErrorReply(e.msg_id, Command.DEVICE_SET_IRQS, exc.errno)
        if self.on_set_irqs is not None:
            self.on_set_irqs(e.index)
        return ev.Ack(e.msg_id, Command.DEVICE_SET_IRQS)

    def reset(self, e: ev.DeviceReset) -> ev.Ack:
        self.backend.reset()
        log.info("device reset by the client")
        return ev.Ack(e.msg_id, Command.DEVICE_RESET)

    def unsupported(self, e: Any) -> ev.ErrorReply:
        # Region io fds, migration and device features are optional; this device offers none.
        return ev.ErrorReply(e.msg_id, type(e).command, errno.ENOTSUP)

    def bad_request(self, e: ev.BadRequest) -> ev.ErrorReply:
        self.counters.protocol_errors += 1
        self._bad_log.warning("bad request (command %d): %s", e.command, e.reason)
        return ev.ErrorReply(e.msg_id, e.command, e.errno)
