"""In-memory vfio-user: raw messages, negotiated sans-IO pairs, fds that travel as with SCM_RIGHTS.

Fds "travel" the way SCM_RIGHTS moves them: the receiver gets fresh duplicates (`os.dup`), the
sender keeps its own. Every fd a test creates is registered with an `FdBag` so it is closed at
the end whatever the connection did with it.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator, Sequence
from typing import Any

from pyvfio_user import events as ev
from pyvfio_user.connection import ClientConnection, ServerConnection, State
from pyvfio_user.constants import FLAG_NO_REPLY, HEADER, TYPE_COMMAND, TYPE_REPLY, Command
from pyvfio_user.errors import ProtocolError
from pyvfio_user.sansio import CLOSED, NEED_DATA, Outgoing
from pyvfio_user.version import Capabilities

QEMU_VERSION_JSON = (
    b'{"capabilities":{"pgsizes":4096,"max_msg_fds":16,"max_dma_maps":65535,'
    b'"max_data_xfer_size":1048576,"migration":{"pgsize":4096,"max_bitmap_size":1048576},'
    b'"write_multiple":true}}'
)
QEMU_CAPS = Capabilities(
    max_msg_fds=16,
    max_data_xfer_size=1 << 20,
    max_dma_maps=65535,
    pgsizes=4096,
    write_multiple=True,
    extra=(("migration", '{"max_bitmap_size": 1048576, "pgsize": 4096}'),),
)
QEMU_KEYS = frozenset(
    {"pgsizes", "max_msg_fds", "max_dma_maps", "max_data_xfer_size", "migration", "write_multiple"}
)


def raw(
    msg_id: int,
    command: int,
    payload: bytes = b"",
    *,
    flags: int = TYPE_COMMAND,
    size: int | None = None,
    error: int = 0,
) -> bytes:
    """One message built by hand: header (size defaults to the true size) plus payload."""
    total = HEADER.size + len(payload) if size is None else size
    return HEADER.pack(msg_id, command, total, flags, error) + payload


def raw_reply(msg_id: int, command: int, payload: bytes = b"") -> bytes:
    return raw(msg_id, command, payload, flags=TYPE_REPLY)


def posted(msg_id: int, command: int, payload: bytes = b"") -> bytes:
    return raw(msg_id, command, payload, flags=TYPE_COMMAND | FLAG_NO_REPLY)


def region_read_payload(offset: int, region: int, count: int) -> bytes:
    return struct.pack("<QII", offset, region, count)


def region_read(msg_id: int, offset: int = 0, region: int = 7, count: int = 4) -> bytes:
    return raw(msg_id, Command.REGION_READ, region_read_payload(offset, region, count))


class FdBag:
    """Fds a test made; closes whichever are still open at the end."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def add(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        return self.add(r), self.add(w)

    def eventfd(self) -> int:
        return self.add(os.eventfd(0, os.EFD_CLOEXEC))

    def memfd(self, size: int = 4096) -> int:
        fd = self.add(os.memfd_create("vfio-user-test", os.MFD_CLOEXEC))
        os.ftruncate(fd, size)
        return fd

    def travel(self, fds: Sequence[int]) -> list[int]:
        """What the receiving end of SCM_RIGHTS would get: fresh duplicates."""
        return [self.add(os.dup(fd)) for fd in fds]

    def close_all(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


def drain(conn: ServerConnection | ClientConnection) -> list[Any]:
    """Every event buffered up to NEED_DATA or CLOSED (the sentinel is not included)."""
    out: list[Any] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA or event is CLOSED:
            return out
        out.append(event)


def one_event(conn: ServerConnection | ClientConnection) -> Any:
    """The single event buffered; fails if there are none or more."""
    events = drain(conn)
    assert len(events) == 1, events
    return events[0]


def deliver(
    out: Outgoing, to: ServerConnection | ClientConnection, bag: FdBag | None = None
) -> list[int]:
    """Feed an Outgoing to the other end, fds duplicated as SCM_RIGHTS would; returns those."""
    fds = bag.travel(out.fds) if bag is not None else []
    if out.fds and bag is None:
        raise AssertionError("fds travel only with an FdBag")
    to.receive_data(out.data, fds)
    return fds


def negotiated_pair(
    client_caps: Capabilities | None = None, server_caps: Capabilities | None = None
) -> tuple[ClientConnection, ServerConnection]:
    """A client and a server that completed VERSION, both READY."""
    client = ClientConnection() if client_caps is None else ClientConnection(client_caps)
    server = ServerConnection() if server_caps is None else ServerConnection(server_caps)
    out = client.send(ev.VersionRequest(client.next_msg_id(), 0, 0, client.capabilities))
    server.receive_data(out.data)
    request = one_event(server)
    assert isinstance(request, ev.VersionRequest)
    reply = server.version_reply(request)
    client.receive_data(server.send(reply).data)
    assert isinstance(one_event(client), ev.VersionReply)
    return client, server


def ready_server(caps: Capabilities | None = None) -> ServerConnection:
    return negotiated_pair(server_caps=caps)[1]


def chunked(data: bytes, cuts: Sequence[int]) -> Iterator[bytes]:
    """`data` split at the given offsets (sorted, deduplicated, clipped to the inside)."""
    points = sorted({p for p in cuts if 0 < p < len(data)})
    prev = 0
    for p in [*points, len(data)]:
        yield data[prev:p]
        prev = p


def pump_all(conn: ServerConnection | ClientConnection, chunks: Sequence[bytes]) -> list[Any]:
    """Feed chunks one by one, pulling events after each feed (as a real loop does)."""
    events: list[Any] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        events.extend(drain(conn))
    return events


def expect_fatal(conn: ServerConnection | ClientConnection, data: bytes) -> ProtocolError:
    """Feeding `data` and pulling events ends in a fatal ProtocolError (and no event)."""
    try:
        conn.receive_data(data)
        events = drain(conn)
    except ProtocolError as exc:
        assert exc.fatal
        return exc
    raise AssertionError(f"no fatal ProtocolError; events {events}")


def state(conn: ServerConnection | ClientConnection) -> State:
    """The connection's state, read through a call so that mypy does not narrow it."""
    return conn.state
