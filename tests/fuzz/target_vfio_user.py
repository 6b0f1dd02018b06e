"""Fuzz target: vfio-user connections (pyvfio_user), server and client, whole streams with fds.

The stream goes to one of five connections (a fresh server, a READY server with DMA requests
outstanding, a fresh client, a client awaiting its VERSION reply, a READY client with one
request of every kind outstanding), cut into chunks, some chunks carrying real eventfds.
Every event is answered where a reply is owed, as devmodel does. Invariants:

- nothing but ProtocolError escapes, and an escaping one is fatal and leaves the connection
  BROKEN (every later call raises again); the state is always a `State`;
- a well-framed bad request is a `BadRequest` with one of the errnos the connection uses, and
  an unknown command is ENOSYS; a reply is owed to it exactly unless it was posted (NO_REPLY),
  and a reply to a posted request is refused by send();
- every fd fed in is inside a delivered event (and still open) or closed by the connection;
- the stream stays in sync: when the connection is not broken and holds no partial message, a
  request appended to the stream comes out as exactly that request's event (or its BadRequest);
- chunking does not matter: without fds, the chunked stream gives what the whole stream gives,
  and the server's `next_read` shortcut (the alternate driving mode) gives what `next_event`
  gives.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from typing import Any

from pyvfio_user import codec
from pyvfio_user import constants as c
from pyvfio_user import events as ev
from pyvfio_user.connection import ClientConnection, ServerConnection, State
from pyvfio_user.constants import Command
from pyvfio_user.errors import ProtocolError
from pyvfio_user.sansio import CLOSED, NEED_DATA
from pyvfio_user.version import Capabilities
from tests.fuzz.common import FdLedger, Plan, fds_for, parse_plan

Conn = ServerConnection | ClientConnection
SMALL = Capabilities(max_msg_fds=4, max_data_xfer_size=4096, write_multiple=True)
ERRNOS = frozenset({errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.E2BIG})
SYNC_ID = 0xBEEF


def _negotiated() -> tuple[ClientConnection, ServerConnection]:
    client, server = ClientConnection(SMALL), ServerConnection(SMALL)
    server.receive_data(client.send(ev.VersionRequest(client.next_msg_id(), 0, 0, SMALL)).data)
    request = server.next_event()
    assert isinstance(request, ev.VersionRequest)
    client.receive_data(server.send(server.version_reply(request)).data)
    assert isinstance(client.next_event(), ev.VersionReply)
    return client, server


def ready_server() -> Conn:
    """READY, with a DMA_READ (id 0) and a DMA_WRITE (id 1) awaiting replies."""
    _, server = _negotiated()
    server.send(ev.DmaRead(server.next_msg_id(), 0x1000, 16))
    server.send(ev.DmaWrite(server.next_msg_id(), 0x2000, b"abcd"))
    return server


def version_pending_client() -> Conn:
    client = ClientConnection(SMALL)
    client.send(ev.VersionRequest(0, 0, 0, SMALL))
    return client


CLIENT_PENDING: tuple[ev.Event, ...] = (
    ev.DmaMap(1, 3, 0, 0, 4096),
    ev.DmaUnmap(2, 0, 0, 4096),
    ev.DeviceGetInfo(3),
    ev.DeviceGetRegionInfo(4, 2, argsz=256),
    ev.DeviceGetRegionIoFds(5, 0, argsz=256),
    ev.DeviceGetIrqInfo(6, 0),
    ev.DeviceSetIrqs(7, 0x21, 0, 0, 1),
    ev.RegionRead(8, 0, 0, 8),
    ev.RegionWrite(9, 0, 0, b"ab"),
    ev.DeviceReset(10),
    ev.RegionWriteMulti(11, (ev.WriteEntry(0, 0, b"a"),)),
    ev.DeviceFeature(12, 0),
    ev.MigDataRead(13, 16),
    ev.MigDataWrite(14, b"abc"),
)
"""What the READY client has outstanding: ids 1-14 (0 was its VERSION)."""


def ready_client() -> Conn:
    client, _ = _negotiated()
    for request in CLIENT_PENDING:
        client.send(request)
    return client


VARIANTS: tuple[Callable[[], Conn], ...] = (
    lambda: ServerConnection(SMALL),
    ready_server,
    lambda: ClientConnection(SMALL),
    version_pending_client,
    ready_client,
)

# The command of each request event a server receives, by type (the table the codec builds).
REQUEST_COMMAND: dict[type, int] = {row.request.event: int(row.command) for row in codec.TABLE}


def event_fds(event: Any) -> list[int]:
    """The fds an event carries, whatever its type (a new event type needs no change here)."""
    fd = getattr(event, "fd", None)
    fds = list(getattr(event, "fds", ()))
    return fds if fd is None else [fd, *fds]


def _answer(conn: Conn, event: Any) -> None:
    """Answer what is owed a reply, as devmodel does; a reply to a posted request must be
    refused, one to a request awaiting it accepted."""
    if isinstance(conn, ServerConnection) and isinstance(event, ev.VersionRequest):
        if not event.no_reply:
            conn.send(conn.version_reply(event))  # may negotiate: later messages go deeper
        return
    if isinstance(event, ev.BadRequest):
        assert event.errno in ERRNOS, f"BadRequest with errno {event.errno}: {event}"
        command = event.command
    elif isinstance(conn, ServerConnection) and type(event) in REQUEST_COMMAND:
        command = REQUEST_COMMAND[type(event)]
    elif isinstance(conn, ClientConnection) and isinstance(event, ev.DmaRead | ev.DmaWrite):
        command = Command.DMA_READ if isinstance(event, ev.DmaRead) else Command.DMA_WRITE
    else:
        return
    error = ev.ErrorReply(event.msg_id, command, errno.EIO)
    if event.no_reply:
        try:
            conn.send(error)
        except ProtocolError:
            return
        raise AssertionError(f"a reply to posted {event} was accepted")
    out = conn.send(error)
    assert out.data == struct.pack("<HHIII", event.msg_id, command, 16, 0x21, errno.EIO)


def _take(conn: Conn, use_next_read: bool) -> Any:
    """The next event; with `use_next_read` a READY server first tries the trapped-read
    shortcut and turns what it took into the event `next_event` would have returned."""
    if use_next_read and isinstance(conn, ServerConnection):
        read = conn.next_read()
        if read is NEED_DATA:
            return NEED_DATA
        if isinstance(read, tuple):
            return conn.owe_read(*read)
    return conn.next_event()


def drive(conn: Conn, plan: Plan, ledger: FdLedger | None, use_next_read: bool) -> list[Any]:
    """Feed the plan's chunks, pull and answer every event; the outcomes, ending with the
    message of a ProtocolError if one escaped."""
    outcomes: list[Any] = []
    batches = ledger.batches if ledger is not None else [[] for _ in plan.chunks]
    chunks = [*plan.chunks, b""] if plan.eof else plan.chunks
    broken = False
    for i, chunk in enumerate(chunks):
        # Fed also once broken: the connection must close the fds that still arrive.
        conn.receive_data(chunk, batches[i] if i < len(batches) else [])
        if broken:
            continue
        try:
            while True:
                assert isinstance(conn.state, State), conn.state
                event = _take(conn, use_next_read)
                if event is NEED_DATA or event is CLOSED:
                    break
                assert isinstance(event, ev.Event), event
                outcomes.append(event)
                _answer(conn, event)
        except ProtocolError as exc:
            assert exc.fatal, f"a non-fatal ProtocolError escaped next_event: {exc}"
            assert conn.state is State.BROKEN, f"{conn.state} after fatal {exc}"
            try:
                conn.next_event()
            except ProtocolError:
                pass
            else:
                raise AssertionError("a broken connection parsed again") from None
            outcomes.append(f"ProtocolError: {exc}")
            broken = True
    return outcomes


def _check_unknown_commands(conn: Conn, outcomes: list[Any]) -> None:
    if not isinstance(conn, ServerConnection):
        return
    for event in outcomes:
        if (
            isinstance(event, ev.BadRequest)
            and event.command not in codec.REQUESTS
            and "flags" not in event.reason
        ):
            assert event.errno == errno.ENOSYS, f"unknown command refused with {event}"


def _sync_message(conn: Conn) -> tuple[bytes, type]:
    """A request the connection's peer may send, and the event it must give."""
    if isinstance(conn, ServerConnection):
        payload = struct.pack("<IIII", 16, 0, 0, 0)
        head = struct.pack("<HHIII", SYNC_ID, Command.DEVICE_GET_INFO, 32, c.TYPE_COMMAND, 0)
        return head + payload, ev.DeviceGetInfo
    payload = struct.pack("<QQ", 0x1000, 8)
    head = struct.pack("<HHIII", SYNC_ID, Command.DMA_READ, 32, c.TYPE_COMMAND, 0)
    return head + payload, ev.DmaRead


def _check_sync(conn: Conn, plan: Plan) -> None:
    """After whatever came before, a good request is understood as itself."""
    if plan.eof or conn.state in (State.BROKEN, State.CLOSED) or conn.buffered:
        return
    raw, want = _sync_message(conn)
    conn.receive_data(raw)
    event = conn.next_event()
    assert isinstance(event, ev.Event)
    assert isinstance(event, want | ev.BadRequest), f"stream out of sync: {event}"
    assert event.msg_id == SYNC_ID, f"stream out of sync: {event}"
    if isinstance(event, ev.BadRequest):
        # Only the state may refuse it (a server before VERSION): the message is well formed.
        assert event.errno == errno.EINVAL and "VERSION" in event.reason, event
    assert conn.next_event() is NEED_DATA


def one_input(data: bytes) -> None:
    plan = parse_plan(data)
    make = VARIANTS[plan.variant % len(VARIANTS)]
    conn = make()
    with fds_for(plan) as ledger:
        outcomes = drive(conn, plan, ledger, plan.alternate)
        _check_unknown_commands(conn, outcomes)
        _check_sync(conn, plan)
        conn.close()
        assert conn.state is State.CLOSED
        handed = {fd for event in outcomes for fd in event_fds(event)}
        ledger.check(handed)
    if not plan.carries_fds and (len(plan.chunks) > 1 or plan.alternate):
        whole = Plan(plan.variant, plan.eof, chunks=[plan.stream] if plan.stream else [])
        again = drive(make(), whole, None, use_next_read=False)
        assert again == outcomes, f"chunking or next_read changed the events: {outcomes} {again}"
