"""The vfio-user transport: a trio server that presents the PCI function to one client.

One client at a time (QEMU's vfio-user-pci); further clients wait in the listen backlog until
the current one leaves. Requests are handled strictly in order, because the client expects
replies in order and QEMU holds its big lock while it waits. The socket is driven directly with
non-blocking `recvmsg_into` into one reused buffer and `trio.lowlevel.wait_readable`, which
keeps the per-access cost of the event loop to a few microseconds.

BAR0 is never offered as MMAP: a vfio-user server cannot take back a mapping it gave away, and
lent memory must be revocable (shared/reference/vfio-user.md). Every access is trapped.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import socket
from collections.abc import Callable
from typing import Any, Final

import trio

from devmodel.counters import DeviceCounters
from devmodel.dma import DmaError, DmaRegion, DmaTable
from devmodel.pci.function import AccessError, PciFunction
from devmodel.ratelimit import RateLimitedLogger
from pyvfio_user import constants as c
from pyvfio_user import events as ev
from pyvfio_user.connection import SERVER_DEFAULT_CAPS, ServerConnection
from pyvfio_user.constants import Command
from pyvfio_user.errors import ProtocolError
from pyvfio_user.sansio import CLOSED, NEED_DATA
from pyvfio_user.version import Capabilities

log = logging.getLogger("devmodel.vfio_user")

RECV_BUFFER: Final = 2 << 20
# Room for the most fds Linux passes in one message (SCM_MAX_FD), so none is ever truncated.
ANCILLARY_SPACE: Final = socket.CMSG_SPACE(253 * 4)
_FD_SIZE: Final = array.array("i").itemsize

_BAR_REGIONS: Final = range(6)
# How long a graceful stop may spend answering what the client already sent.
STOP_DRAIN_SECONDS: Final = 0.5
_HOT_COMMANDS: Final[dict[type, int]] = {
    ev.RegionRead: Command.REGION_READ,
    ev.RegionWrite: Command.REGION_WRITE,
    ev.RegionWriteMulti: Command.REGION_WRITE_MULTI,
}


class VfioUserServer:
    """Serves `device` over vfio-user to whichever client connects to `listener`."""

    def __init__(
        self,
        device: PciFunction,
        counters: DeviceCounters,
        capabilities: Capabilities = SERVER_DEFAULT_CAPS,
        on_client: Callable[[str], None] | None = None,
    ) -> None:
        self.device = device
        self.counters = counters
        self.capabilities = capabilities
        self._on_client = on_client
        self._bad_log = RateLimitedLogger(log)
        self.connected = False

    # ------------------------------------------------------------------ accepting

    async def serve(
        self,
        listener: socket.socket,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept clients one after another, forever (until cancelled)."""
        listener.setblocking(False)
        task_status.started()
        while True:
            await trio.lowlevel.wait_readable(listener)
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            with sock:
                sock.setblocking(False)
                self.counters.client_connects += 1
                self.connected = True
                log.info("client connected")
                if self._on_client:
                    self._on_client("connected")
                try:
                    await self.serve_client(sock)
                finally:
                    self.connected = False
                    if self._on_client:
                        self._on_client("disconnected")

    async def serve_client(self, sock: socket.socket) -> None:
        """Run one client's session to its end; the device survives whatever happens here."""
        session = _Session(self, sock)
        try:
            await session.run()
        except ProtocolError as exc:
            self.counters.protocol_errors += 1
            log.error("dropping the client: %s", exc)
        except OSError as exc:
            log.warning("client connection failed: %s", exc)
        finally:
            session.close()
            log.info("client gone")

    # ------------------------------------------------------------------ requests

    def region_info(self, e: ev.DeviceGetRegionInfo) -> ev.RegionInfo | ev.ErrorReply:
        index = e.index
        if index in _BAR_REGIONS:
            size = self.device.region_size(index)
        elif index == c.PciRegion.CONFIG:
            size = self.device.config_size
        elif index in (c.PciRegion.ROM, c.PciRegion.VGA):
            size = 0
        else:
            return ev.ErrorReply(e.msg_id, Command.DEVICE_GET_REGION_INFO, errno.EINVAL)
        flags = c.REGION_INFO_FLAG_READ | c.REGION_INFO_FLAG_WRITE if size else 0
        return ev.RegionInfo(e.msg_id, index, flags, size, 0, argsz=e.argsz)


class _Session:
    """One client connection's state: the protocol object, DMA maps, the receive buffer."""

    def __init__(self, server: VfioUserServer, sock: socket.socket) -> None:
        self.server = server
        self.device = server.device
        self.counters = server.counters
        self.sock = sock
        self.conn = ServerConnection(server.capabilities)
        self.dma = DmaTable(server.capabilities.max_dma_maps)
        self.buffer = bytearray(RECV_BUFFER)
        self.view = memoryview(self.buffer)
        self.out: list[tuple[bytes, tuple[int, ...]]] = []
        # The request being served while an await is pending: answered on a forced stop.
        self._current: ev.RegionRead | ev.RegionWrite | ev.RegionWriteMulti | None = None
        self._handlers: dict[type, Callable[[Any], Any]] = {
            ev.VersionRequest: self._version,
            ev.DmaMap: self._dma_map,
            ev.DmaUnmap: self._dma_unmap,
            ev.DeviceGetInfo: self._device_info,
            ev.DeviceGetRegionInfo: self.server.region_info,
            ev.DeviceGetRegionIoFds: self._unsupported,
            ev.DeviceGetIrqInfo: self._irq_info,
            ev.DeviceSetIrqs: self._set_irqs,
            ev.DeviceReset: self._reset,
            ev.DeviceFeature: self._unsupported,
            ev.MigDataRead: self._unsupported,
            ev.MigDataWrite: self._unsupported,
            ev.BadRequest: self._bad_request,
        }

    def close(self) -> None:
        self.conn.close()
        self.dma.clear()
        # The eventfds belong to this client; a new client sets up its own.
        self.device.irqs.close()
        self.view.release()

    async def run(self) -> None:
        try:
            while True:
                await self._recv()
                if not await self._process():
                    return
                if self.out:
                    await self._flush()
        except trio.Cancelled:
            await self._drain_on_stop()
            raise

    async def _process(self) -> bool:
        """Handle every complete request buffered, in order; False once the client closed."""
        conn = self.conn
        device = self.device
        out = self.out
        while True:
            event = conn.next_event()
            kind = type(event)
            # The hot path, inline: trapped reads and posted writes on a BAR.
            if kind is ev.RegionRead:
                self._current = event
                region = event.region
                try:
                    if region < 6:
                        data = await device.bar_read(region, event.offset, event.count)
                    elif region == 7:
                        data = device.config_read(event.offset, event.count)
                    else:
                        raise AccessError(errno.EINVAL, f"region {region} cannot be read")
                except AccessError as exc:
                    self._refused_access("read", event.region, event.offset, exc)
                    out.append(conn.send(ev.ErrorReply(event.msg_id, 9, exc.errno)))
                    self._current = None
                    continue
                out.append(conn.send(ev.RegionReadReply(event.msg_id, event.offset, region, data)))
                self._current = None
            elif kind is ev.RegionWrite:
                self._current = event
                ok = await self._write(event.region, event.offset, event.data)
                if not event.no_reply:
                    if ok is None:
                        reply: Any = ev.RegionWriteReply(
                            event.msg_id, event.offset, event.region, len(event.data)
                        )
                    else:
                        reply = ev.ErrorReply(event.msg_id, 10, ok)
                    out.append(conn.send(reply))
                self._current = None
            elif event is NEED_DATA:
                return True
            elif event is CLOSED:
                await self._flush()
                return False
            elif kind is ev.RegionWriteMulti:
                self._current = event
                done = 0
                for w in event.writes:
                    if await self._write(w.region, w.offset, w.data) is None:
                        done += 1
                if not event.no_reply:
                    out.append(conn.send(ev.RegionWriteMultiReply(event.msg_id, done)))
                self._current = None
            else:
                reply = self._handlers[kind](event)
                if reply is not None and not getattr(event, "no_reply", False):
                    out.append(conn.send(reply))

    async def _drain_on_stop(self) -> None:
        """On a graceful stop, answer what the client already sent before the socket closes.

        QEMU 11.1's client aborts when the server's socket is reset under it, which is what
        closing a socket with unread requests in it does; and a vCPU whose request was taken
        but not answered waits out the whole reply timeout. So: answer the request being
        served (with an error if it cannot finish), read and answer whatever else is already
        there, within a short deadline, and only then let the socket close.
        """
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + STOP_DRAIN_SECONDS
            try:
                current = self._current
                if current is not None:
                    self._current = None
                    if not getattr(current, "no_reply", False):
                        command = _HOT_COMMANDS[type(current)]
                        self.out.append(
                            self.conn.send(ev.ErrorReply(current.msg_id, command, errno.EIO))
                        )
                # Requests that arrived in the same read as the one being served are already
                # in the connection's buffer: answer those first, then whatever the socket holds.
                more = await self._process()
                while more and self._recv_nowait():
                    more = await self._process()
                if self.out:
                    await self._flush()
            except (ProtocolError, OSError) as exc:
                log.info("could not answer everything before stopping: %s", exc)

    async def _write(self, region: int, offset: int, data: bytes) -> int | None:
        """Apply one write; None when done, else the errno it was refused with."""
        try:
            if region < 6:
                await self.device.bar_write(region, offset, data)
            elif region == 7:
                self.device.config_write(offset, data)
            else:
                raise AccessError(errno.EINVAL, f"region {region} cannot be written")
        except AccessError as exc:
            self._refused_access("write", region, offset, exc)
            return exc.errno
        return None

    def _refused_access(self, what: str, region: int, offset: int, exc: AccessError) -> None:
        self.server._bad_log.warning(
            "refused %s of region %d at %#x: %s", what, region, offset, exc
        )

    # ------------------------------------------------------------------ socket

    async def _recv(self) -> None:
        sock = self.sock
        while True:
            try:
                n, anc, flags, _ = sock.recvmsg_into(
                    [self.view], ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
                )
                break
            except (BlockingIOError, InterruptedError):
                await trio.lowlevel.wait_readable(sock)
            except ConnectionResetError:
                n, anc, flags = 0, [], 0
                break
        self._feed(n, anc, flags)

    def _feed(self, n: int, anc: list[tuple[int, int, bytes]], flags: int) -> None:
        fds: list[int] = []
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(data) - len(data) % _FD_SIZE
                fds.extend(array.array("i", data[:usable]))
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise ProtocolError("file descriptors were truncated in transit")
        self.conn.receive_data(self.view[:n], fds)

    def _recv_nowait(self) -> bool:
        """Feed whatever is readable right now; False when nothing (or the end) was there."""
        try:
            n, anc, flags, _ = self.sock.recvmsg_into(
                [self.view], ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return False
        except ConnectionResetError:
            n, anc, flags = 0, [], 0
        self._feed(n, anc, flags)
        return n > 0

    async def _flush(self) -> None:
        out = self.out
        # Coalesce consecutive fd-less replies into one send; a message with fds goes alone.
        i = 0
        while i < len(out):
            data, fds = out[i]
            if not fds:
                j = i + 1
                while j < len(out) and not out[j][1]:
                    j += 1
                if j - i > 1:
                    data = b"".join(d for d, _ in out[i:j])
                await self._send_all(data, ())
                i = j
            else:
                await self._send_all(data, fds)
                i += 1
        out.clear()

    async def _send_all(self, data: bytes, fds: tuple[int, ...]) -> None:
        sock = self.sock
        view = memoryview(data)
        while view:
            try:
                if fds:
                    sent = sock.sendmsg(
                        [view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    )
                    fds = ()
                else:
                    sent = sock.send(view)
                view = view[sent:]
            except (BlockingIOError, InterruptedError):
                await trio.lowlevel.wait_writable(sock)

    # ------------------------------------------------------------------ cold requests

    def _version(self, e: ev.VersionRequest) -> Any:
        reply = self.conn.version_reply(e)
        if isinstance(reply, ev.VersionReply):
            log.info("negotiated vfio-user %d.%d with %s", reply.major, reply.minor, e.capabilities)
        else:
            log.warning("refused client version %d.%d", e.major, e.minor)
        return reply

    def _dma_map(self, e: ev.DmaMap) -> Any:
        region = DmaRegion(e.address, e.size, e.offset, e.flags, e.fd)
        region.overlaps_bar = self._overlaps_bar(e.address, e.size)
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

    def _overlaps_bar(self, address: int, size: int) -> bool:
        for bar in _BAR_REGIONS:
            base = self.device.bar_address(bar)
            length = self.device.region_size(bar)
            if base is not None and length and address < base + length and base < address + size:
                return True
        return False

    def _dma_unmap(self, e: ev.DmaUnmap) -> Any:
        if e.flags & c.DMA_UNMAP_ALL:
            self.dma.clear()
        else:
            try:
                self.dma.remove(e.address, e.size)
            except DmaError as exc:
                return ev.ErrorReply(e.msg_id, Command.DMA_UNMAP, exc.errno)
        return ev.DmaUnmapReply(e.msg_id, e.flags, e.address, e.size, e.argsz)

    def _device_info(self, e: ev.DeviceGetInfo) -> Any:
        return ev.DeviceInfo(
            e.msg_id, c.DEVICE_FLAGS_RESET | c.DEVICE_FLAGS_PCI, c.PCI_NUM_REGIONS, c.PCI_NUM_IRQS
        )

    def _irq_info(self, e: ev.DeviceGetIrqInfo) -> Any:
        if e.index >= c.PCI_NUM_IRQS:
            return ev.ErrorReply(e.msg_id, Command.DEVICE_GET_IRQ_INFO, errno.EINVAL)
        flags, count = self.device.irqs.info(e.index)
        return ev.IrqInfo(e.msg_id, e.index, flags, count)

    def _set_irqs(self, e: ev.DeviceSetIrqs) -> Any:
        try:
            self.device.irqs.set_irqs(e.flags, e.index, e.start, e.count, e.data, list(e.fds))
        except AccessError as exc:
            log.warning("refused SET_IRQS: %s", exc)
            return ev.ErrorReply(e.msg_id, Command.DEVICE_SET_IRQS, exc.errno)
        return ev.Ack(e.msg_id, Command.DEVICE_SET_IRQS)

    def _reset(self, e: ev.DeviceReset) -> Any:
        self.device.reset()
        log.info("device reset by the client")
        return ev.Ack(e.msg_id, Command.DEVICE_RESET)

    def _unsupported(self, e: Any) -> Any:
        # Region io fds, migration and device features are optional; this device offers none.
        return ev.ErrorReply(e.msg_id, _command_of(e), errno.ENOTSUP)

    def _bad_request(self, e: ev.BadRequest) -> Any:
        self.counters.protocol_errors += 1
        self.server._bad_log.warning("bad request (command %d): %s", e.command, e.reason)
        return ev.ErrorReply(e.msg_id, e.command, e.errno)


def _command_of(e: Any) -> int:
    return {
        ev.DeviceGetRegionIoFds: Command.DEVICE_GET_REGION_IO_FDS,
        ev.DeviceFeature: Command.DEVICE_FEATURE,
        ev.MigDataRead: Command.MIG_DATA_READ,
        ev.MigDataWrite: Command.MIG_DATA_WRITE,
    }[type(e)]
