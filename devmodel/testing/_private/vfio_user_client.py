"""A small blocking vfio-user client: what tests, benchmarks and tooling use to play QEMU.

It drives `pyvfio_user.ClientConnection` over a plain blocking socket, so it works
in any thread or process without an event loop, and it performs the attach sequence QEMU's
vfio-user-pci performs (shared/reference/vfio-user.md), so tests exercise the same path.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from typing import Any

from devmodel.unixfds import ancillary_space, fds_from_ancillary, send_nowait
from pyvfio_user import constants as c
from pyvfio_user import events as ev
from pyvfio_user.connection import CLIENT_DEFAULT_CAPS, ClientConnection
from pyvfio_user.errors import ProtocolError
from pyvfio_user.sansio import CLOSED, NEED_DATA
from pyvfio_user.version import Capabilities

_ANCILLARY_SPACE = ancillary_space()


class ErrorReplyReceived(Exception):
    def __init__(self, reply: ev.ErrorReply) -> None:
        super().__init__(f"command {reply.command} failed with errno {reply.errno}")
        self.reply = reply


class VfioUserClient:
    def __init__(self, path: str, capabilities: Capabilities = CLIENT_DEFAULT_CAPS) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.conn = ClientConnection(capabilities)
        self._buf = bytearray(1 << 21)
        self._view = memoryview(self._buf)

    def close(self) -> None:
        self.conn.close()
        self.sock.close()

    def __enter__(self) -> VfioUserClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def send(self, event: Any) -> None:
        out = self.conn.send(event)
        self.send_raw(out.data, out.fds)

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        view = memoryview(data)
        sent = send_nowait(self.sock, view, fds)
        self.sock.sendall(view[sent:])

    def receive(self) -> Any:
        """The next event from the server, reading the socket as needed."""
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                if event is CLOSED:
                    raise ConnectionError("the server closed the connection")
                return event
            # Not unixfds.recv_nowait: a reset must stay a ConnectionResetError here, so that
            # tests can tell it from an orderly close.
            n, anc, flags, _ = self.sock.recvmsg_into(
                [self._view], _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
            )
            fds = fds_from_ancillary(anc, flags)
            self.conn.receive_data(self._view[:n], fds)

    def request(self, event: Any) -> Any:
        """Send a request and return its reply; an error reply raises ErrorReplyReceived."""
        self.send(event)
        reply = self.receive()
        if isinstance(reply, ev.ErrorReply):
            raise ErrorReplyReceived(reply)
        return reply

    def next_id(self) -> int:
        return self.conn.next_msg_id()

    # ------------------------------------------------------------------ operations

    def negotiate(self) -> ev.VersionReply:
        reply = self.request(ev.VersionRequest(self.next_id(), 0, 0, self.conn.capabilities))
        if not isinstance(reply, ev.VersionReply):
            raise ProtocolError(f"VERSION answered with {reply}")
        return reply

    def attach(self) -> dict[str, Any]:
        """The attach sequence QEMU's vfio-user-pci performs; returns what it learned."""
        version = self.negotiate()
        info = self.request(ev.DeviceGetInfo(self.next_id()))
        regions = {
            index: self.request(ev.DeviceGetRegionInfo(self.next_id(), index))
            for index in (0, 1, 2, 3, 4, 5, 7)
        }
        irq_err = self.request(ev.DeviceGetIrqInfo(self.next_id(), c.PciIrq.ERR))
        config = self.read(c.PciRegion.CONFIG, 0, 256)
        return {
            "version": version,
            "info": info,
            "regions": regions,
            "err_irq": irq_err,
            "config": config,
        }

    def read(self, region: int, offset: int, count: int) -> bytes:
        reply = self.request(ev.RegionRead(self.next_id(), offset, region, count))
        assert isinstance(reply, ev.RegionReadReply)
        return reply.data

    def write(self, region: int, offset: int, data: bytes) -> None:
        self.request(ev.RegionWrite(self.next_id(), offset, region, data))

    def posted_write(self, region: int, offset: int, data: bytes) -> None:
        self.send(ev.RegionWrite(self.next_id(), offset, region, data, no_reply=True))

    def read_u32(self, region: int, offset: int) -> int:
        value: int = struct.unpack("<I", self.read(region, offset, 4))[0]
        return value

    def read_u64(self, region: int, offset: int) -> int:
        value: int = struct.unpack("<Q", self.read(region, offset, 8))[0]
        return value

    def reset(self) -> None:
        self.request(ev.DeviceReset(self.next_id()))

    def command(self, event: Any) -> Any:
        """Send any request; return its reply event, error replies included."""
        self.send(event)
        return self.receive()
