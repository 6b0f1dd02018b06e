"""Property tests for the vfio-user connections.

(a) Any bytes, in any chunks, give events, NEED_DATA/CLOSED or ProtocolError: nothing else
    escapes, and every fd fed in is either handed out in an event or closed. Owed replies are
    consistent: what may be answered can be, what is posted cannot be.
(b) Any chunking of a valid request stream yields the same events.
(c) Random JSON in the VERSION capability slots parses or raises ProtocolError, and a server's
    reply to whatever parsed names only the client's keys and decodes at a client.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devmodel.testing import QEMU_VERSION_JSON, chunked, fd_is_open, negotiated_pair
from pyvfio_user import constants as c
from pyvfio_user import events as ev
from pyvfio_user.connection import ClientConnection, ServerConnection
from pyvfio_user.constants import Command
from pyvfio_user.errors import ProtocolError
from pyvfio_user.sansio import CLOSED, NEED_DATA
from pyvfio_user.version import Capabilities, parse_capabilities

# The whole file stays well under 20 s on a 2-core machine.
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_MORE = settings(FUZZ, max_examples=700)
SMALL = Capabilities(max_msg_fds=4, max_data_xfer_size=4096, write_multiple=True)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)

Conn = ServerConnection | ClientConnection


# ---------------------------------------------------------------- connections to fuzz


def fresh_server() -> ServerConnection:
    return ServerConnection(SMALL)


def ready_server_with_pending() -> ServerConnection:
    """READY, with a DMA_READ (id 0) and a DMA_WRITE (id 1) awaiting replies."""
    _, server = negotiated_pair(server_caps=SMALL)
    server.send(ev.DmaRead(server.next_msg_id(), 0x1000, 16))
    server.send(ev.DmaWrite(server.next_msg_id(), 0x2000, b"abcd"))
    return server


def version_pending_client() -> ClientConnection:
    client = ClientConnection(SMALL)
    client.send(ev.VersionRequest(0, 0, 0, SMALL))
    return client


# msg id -> the request a READY client has outstanding with that id (id 0 was VERSION).
CLIENT_PENDING: dict[int, Any] = {
    1: ev.DmaMap(1, 3, 0, 0, 4096),
    2: ev.DmaUnmap(2, 0, 0, 4096),
    3: ev.DeviceGetInfo(3),
    4: ev.DeviceGetRegionInfo(4, 2, argsz=256),
    5: ev.DeviceGetRegionIoFds(5, 0, argsz=256),
    6: ev.DeviceGetIrqInfo(6, 0),
    7: ev.DeviceSetIrqs(7, 0x21, 0, 0, 1),
    8: ev.RegionRead(8, 0, 0, 8),
    9: ev.RegionWrite(9, 0, 0, b"ab"),
    10: ev.DeviceReset(10),
    11: ev.RegionWriteMulti(11, (ev.WriteEntry(0, 0, b"a"),)),
    12: ev.DeviceFeature(12, 0),
    13: ev.MigDataRead(13, 16),
    14: ev.MigDataWrite(14, b"abc"),
}


def ready_client_with_pending() -> ClientConnection:
    client, _ = negotiated_pair(client_caps=SMALL)
    for request in CLIENT_PENDING.values():
        client.send(request)
    return client


REQUEST_COMMANDS: dict[type, int] = {
    ev.VersionRequest: 1, ev.DmaMap: 2, ev.DmaUnmap: 3, ev.DeviceGetInfo: 4,
    ev.DeviceGetRegionInfo: 5, ev.DeviceGetRegionIoFds: 6, ev.DeviceGetIrqInfo: 7,
    ev.DeviceSetIrqs: 8, ev.RegionRead: 9, ev.RegionWrite: 10, ev.DeviceReset: 13,
    ev.RegionWriteMulti: 15, ev.DeviceFeature: 16, ev.MigDataRead: 17, ev.MigDataWrite: 18,
}  # fmt: skip


def _command_of(request: Any) -> int:
    return REQUEST_COMMANDS[type(request)]


CONNECTIONS: dict[str, Callable[[], Conn]] = {
    "fresh-server": fresh_server,
    "ready-server": ready_server_with_pending,
    "fresh-client": lambda: ClientConnection(SMALL),
    "version-pending-client": version_pending_client,
    "ready-client": ready_client_with_pending,
}


# ---------------------------------------------------------------- driving one connection


def _event_fds(event: Any) -> list[int]:
    if isinstance(event, ev.DmaMap | ev.RegionInfo):
        return [] if event.fd is None else [event.fd]
    if isinstance(event, ev.DeviceSetIrqs | ev.RegionIoFds):
        return list(event.fds)
    return []


def _answer(conn: Conn, event: Any) -> None:
    """Exercise the owed-reply bookkeeping: answer where a reply is owed, and only there."""
    if isinstance(conn, ServerConnection) and isinstance(event, ev.VersionRequest):
        if not event.no_reply:
            conn.send(conn.version_reply(event))  # may negotiate: later messages go deeper
        return
    if isinstance(event, ev.BadRequest):
        command = event.command
    elif isinstance(conn, ServerConnection) and type(event) in REQUEST_COMMANDS:
        command = _command_of(event)
    elif isinstance(conn, ClientConnection) and isinstance(event, ev.DmaRead | ev.DmaWrite):
        command = Command.DMA_READ if isinstance(event, ev.DmaRead) else Command.DMA_WRITE
    else:
        return
    error = ev.ErrorReply(event.msg_id, command, 5)
    if event.no_reply:
        try:
            conn.send(error)
        except ProtocolError:
            return
        raise AssertionError(f"a reply to posted {event} was accepted")
    out = conn.send(error)
    assert out.data == struct.pack("<HHIII", event.msg_id, command, 16, 0x21, 5)


def run(conn: Conn, chunks: list[bytes], fd_chunks: set[int]) -> list[Any]:
    """Feed chunks (those at indexes in fd_chunks carry one fresh fd each), pull events.

    Fails on any exception but ProtocolError. At the end every fd fed in is either inside a
    delivered event (open) or closed by the connection.
    """
    made = [os.eventfd(0, os.EFD_CLOEXEC) for _ in fd_chunks]
    batches = dict(zip(sorted(fd_chunks), made, strict=True))
    events: list[Any] = []
    handed: list[int] = []
    fed: list[int] = []
    try:
        try:
            for i, chunk in enumerate(chunks):
                fds = [batches[i]] if i in batches else []
                fed.extend(fds)
                conn.receive_data(chunk, fds)
                while True:
                    event = conn.next_event()
                    if event is NEED_DATA or event is CLOSED:
                        break
                    events.append(event)
                    handed.extend(_event_fds(event))
                    _answer(conn, event)
        except ProtocolError as exc:
            assert isinstance(exc.fatal, bool)
        except Exception as exc:  # anything else is a bug in the connection
            raise AssertionError(f"{type(exc).__name__} escaped: {exc!r}") from exc
        conn.close()
        for fd in fed:
            if fd in handed:
                assert fd_is_open(fd), f"fd {fd} handed out in an event was closed"
            else:
                assert not fd_is_open(fd), f"fd {fd} leaked: neither handed out nor closed"
    finally:
        for fd in made:
            with contextlib.suppress(OSError):
                os.close(fd)
    return events


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    return list(chunked(data, cuts))


# ---------------------------------------------------------------- (a) raw bytes


@FUZZ_MORE
@given(
    name=st.sampled_from(sorted(CONNECTIONS)),
    data=st.binary(max_size=300),
    cuts=st.lists(st.integers(1, 299), max_size=8),
    fd_chunks=st.sets(st.integers(0, 8), max_size=3),
    eof=st.booleans(),
)
def test_any_bytes_give_events_or_protocol_error(
    name: str, data: bytes, cuts: list[int], fd_chunks: set[int], eof: bool
) -> None:
    chunks = split(data, cuts) + ([b""] if eof else [])
    run(CONNECTIONS[name](), chunks, {i for i in fd_chunks if i < len(chunks)})


# ---------------------------------------------------------------- (a) structured messages

FLAGS = [0, 1, 0x10, 0x11, 0x20, 0x21, 0x30, 2, 0xF, 0x40, 0x8000_0000]
COMMANDS = [*range(0, 20), 0xFFFF]
# (msg id, command) pairs some connection is waiting on a reply for.
PENDING_PAIRS = sorted(
    {(k, _command_of(v)) for k, v in CLIENT_PENDING.items()}
    | {(0, Command.DMA_READ), (1, Command.DMA_WRITE), (0, Command.VERSION)}
)


def _pack(fmt: str, *strategies: st.SearchStrategy[int]) -> st.SearchStrategy[bytes]:
    return st.tuples(*strategies).map(lambda values: struct.pack(fmt, *values))


def _with_data(
    fmt: str, head: list[st.SearchStrategy[int]], max_size: int = 24, count_at: int = -1
) -> st.SearchStrategy[bytes]:
    """A fixed part whose field `count_at` is the length of the data that follows."""

    def build(values: tuple[Any, ...]) -> bytes:
        *fields, data = values
        fields.insert(len(fields) + 1 + count_at if count_at < 0 else count_at, len(data))
        return struct.pack(fmt, *fields) + bytes(data)

    return st.tuples(*head, st.binary(max_size=max_size)).map(build)


small = st.integers(0, 40)
count8 = st.integers(0, 9)
argsz_of = {2: 32, 3: 24, 4: 16, 5: 32, 6: 16, 7: 16}


def _argsz(n: int) -> st.SearchStrategy[int]:
    return st.sampled_from([n, n, n, n - 1, 0, 4096])


_entry = _pack("<QIIQ", u64, small, count8, u64)  # offset, region, count, 8 data bytes
PLAUSIBLE: dict[int, list[st.SearchStrategy[bytes]]] = {
    Command.VERSION: [
        st.just(b"\0\0\0\0" + QEMU_VERSION_JSON + b"\0"),
        st.sampled_from([b"\0\0\0\0", b"\0\0\0\0{}\0", b"\0\0\1\0{}\0", b"\1\0\0\0{}\0"]),
    ],
    Command.DMA_MAP: [
        _pack("<IIQQQ", _argsz(32), st.integers(0, 4), u64, st.integers(0, 1 << 48), small),
        st.just(b""),
    ],
    Command.DMA_UNMAP: [
        _pack("<IIQQ", _argsz(24), st.integers(0, 3), st.integers(0, 1 << 48), small),
        st.just(b""),
    ],
    Command.DEVICE_GET_INFO: [_pack("<IIII", _argsz(16), small, small, small)],
    Command.DEVICE_GET_REGION_INFO: [
        _pack("<IIIIQQ", _argsz(32), small, small, small, u64, u64),
        st.builds(
            lambda f, off, chain: struct.pack("<IIIIQQ", 32 + len(chain), f, 0, off, 0, 0) + chain,
            st.integers(0, 0xF),
            st.sampled_from([0, 8, 32, 40, 1000]),
            st.one_of(
                st.binary(max_size=64),
                st.builds(
                    lambda nxt, nr, body: struct.pack("<HHIII", 1, 1, nxt, nr, 0) + body,
                    st.sampled_from([0, 32, 48, 72]),
                    st.integers(0, 4),
                    st.binary(max_size=48),
                ),
                st.builds(
                    lambda body, nxt: struct.pack("<HHI", 2, 1, nxt) + body,
                    st.binary(max_size=16),
                    st.sampled_from([0, 56, 1000]),
                ),
            ),
        ),
    ],
    Command.DEVICE_GET_REGION_IO_FDS: [
        _pack("<IIII", _argsz(16), st.integers(0, 1), small, small),
        st.lists(
            _pack("<QQIIIIQ", u64, u64, st.integers(0, 2), small, small, small, u64), max_size=3
        ).map(
            lambda subs: struct.pack("<IIII", 16 + 40 * len(subs), 0, 0, len(subs)) + b"".join(subs)
        ),
    ],
    Command.DEVICE_GET_IRQ_INFO: [_pack("<IIII", _argsz(16), small, small, small)],
    Command.DEVICE_SET_IRQS: [
        st.builds(
            lambda f, count, data: struct.pack("<IIIII", 20 + len(data), f, 0, 0, count) + data,
            st.sampled_from([0x21, 0x22, 0x24, 0x09, 0x12, 0x3F, 0x40]) | st.integers(0, 0x7F),
            st.integers(0, 4),
            st.binary(max_size=4),
        ),
        st.just(b""),
    ],
    Command.REGION_READ: [
        _pack("<QII", u64, small, st.integers(0, 16)),
        _with_data("<QII", [u64, small], 16),
    ],
    Command.REGION_WRITE: [
        _with_data("<QII", [u64, small], 16),
        _pack("<QII", u64, small, st.integers(0, 16)),
    ],
    Command.DMA_READ: [_pack("<QQ", u64, st.integers(0, 64)), _with_data("<QQ", [u64], 16)],
    Command.DMA_WRITE: [
        _with_data("<QQ", [u64], 16),
        _pack("<QI", u64, small),
        _pack("<QQ", u64, small),
    ],
    Command.DEVICE_RESET: [st.just(b""), st.binary(max_size=2)],
    Command.REGION_WRITE_MULTI: [
        st.lists(_entry, max_size=4).map(lambda es: struct.pack("<Q", len(es)) + b"".join(es)),
        _pack("<Q", st.integers(0, 4)),
    ],
    Command.DEVICE_FEATURE: [
        st.tuples(_argsz(8), u32, st.binary(max_size=16)).map(
            lambda v: struct.pack("<II", v[0], v[1]) + v[2]
        )
    ],
    Command.MIG_DATA_READ: [
        _pack("<II", _argsz(8), small),
        _with_data("<II", [_argsz(8)], 16),
    ],
    Command.MIG_DATA_WRITE: [_with_data("<II", [_argsz(8)], 16), _pack("<II", _argsz(8), small)],
}


SERVER_PENDING_PAIRS = [(0, int(Command.DMA_READ)), (1, int(Command.DMA_WRITE))]
CLIENT_PENDING_PAIRS = [pair for pair in PENDING_PAIRS if pair not in SERVER_PENDING_PAIRS]


@st.composite
def message(draw: st.DrawFn, to_client: bool) -> bytes:
    """A message with a plausible header (mostly right size, mostly known flags) and payload.

    Mostly what the receiving side expects (requests for a server; replies to what it has
    pending and DMA requests for a client), sometimes anything.
    """
    # Hypothesis favours the ends of an integer range: the rare choices sit in the middle.
    kind = draw(st.integers(0, 15))
    ordinary = (c.TYPE_REPLY, c.TYPE_REPLY | c.FLAG_ERROR) if to_client else (0, 0x10)
    if kind in (7, 8):
        flags = ordinary[1]
    elif kind in (9, 10):
        flags = c.TYPE_COMMAND if to_client else c.TYPE_REPLY
    elif kind == 11:
        flags = c.TYPE_COMMAND | c.FLAG_NO_REPLY if to_client else c.TYPE_REPLY | c.FLAG_ERROR
    elif kind == 12:
        flags = draw(st.sampled_from(FLAGS))
    elif kind == 13:
        flags = draw(u32)
    else:
        flags = ordinary[0]
    pending = CLIENT_PENDING_PAIRS if to_client else SERVER_PENDING_PAIRS
    if flags & c.TYPE_MASK == c.TYPE_REPLY and draw(st.integers(0, 7)) != 3:
        msg_id, command = draw(st.sampled_from(pending))
    elif flags & c.TYPE_MASK == c.TYPE_COMMAND and to_client and draw(st.integers(0, 3)) != 2:
        msg_id, command = draw(u16), draw(st.sampled_from([Command.DMA_READ, Command.DMA_WRITE]))
    else:
        msg_id = draw(st.integers(0, 16) | u16)
        command = draw(st.sampled_from(COMMANDS))
    options = PLAUSIBLE.get(command, [])
    if flags & c.FLAG_ERROR and draw(st.booleans()):
        payload = b""
    elif options and draw(st.integers(0, 4)) != 2:
        payload = draw(st.sampled_from(options).flatmap(lambda strategy: strategy))
    else:
        payload = draw(st.binary(max_size=96))
    size = 16 + len(payload)
    if draw(st.integers(0, 31)) == 17:
        size = draw(st.integers(0, 200) | u32)
    error = draw(st.sampled_from([0, 0, 0, 5, 22, 0xFFFF_FFFF]))
    return struct.pack("<HHIII", msg_id, command, size, flags, error) + payload


VERSION_MSG = struct.pack("<HHIII", 0, 1, 16 + 4 + len(QEMU_VERSION_JSON) + 1, 0, 0) + (
    b"\0\0\0\0" + QEMU_VERSION_JSON + b"\0"
)


structured = given(
    data=st.data(),
    version_first=st.booleans(),
    cuts=st.lists(st.integers(1, 1000), max_size=8),
    fd_chunks=st.sets(st.integers(0, 8), max_size=3),
    eof=st.booleans(),
)


def _structured(
    name: str,
    data: st.DataObject,
    version_first: bool,
    cuts: list[int],
    fd_chunks: set[int],
    eof: bool,
) -> None:
    to_client = name.endswith("client")
    messages = data.draw(st.lists(message(to_client), min_size=1, max_size=8), label="messages")
    prefix = [VERSION_MSG] if version_first and name == "fresh-server" else []
    chunks = split(b"".join(prefix + messages), cuts) + ([b""] if eof else [])
    run(CONNECTIONS[name](), chunks, {i for i in fd_chunks if i < len(chunks)})


@FUZZ_MORE
@structured
def test_structured_messages_to_a_server(
    data: st.DataObject, version_first: bool, cuts: list[int], fd_chunks: set[int], eof: bool
) -> None:
    name = data.draw(st.sampled_from(["fresh-server", "ready-server"]), label="name")
    _structured(name, data, version_first, cuts, fd_chunks, eof)


@FUZZ_MORE
@structured
def test_structured_messages_to_a_client(
    data: st.DataObject, version_first: bool, cuts: list[int], fd_chunks: set[int], eof: bool
) -> None:
    name = data.draw(
        st.sampled_from(["ready-client", "version-pending-client", "fresh-client"]), label="name"
    )
    _structured(name, data, version_first, cuts, fd_chunks, eof)


# ---------------------------------------------------------------- (b) chunking invariance

data_st = st.binary(min_size=1, max_size=16)
request_st: st.SearchStrategy[Callable[[int], Any]] = st.one_of(
    st.builds(lambda f, o, a, s: lambda i: ev.DmaMap(i, f, o, a, s),
              st.sampled_from([1, 2, 3]), u64, st.integers(0, 1 << 40), st.integers(1, 1 << 40)),
    st.builds(lambda a, s: lambda i: ev.DmaUnmap(i, 0, a, s), u64, u64),
    st.just(lambda i: ev.DmaUnmap(i, c.DMA_UNMAP_ALL, 0, 0)),
    st.just(ev.DeviceGetInfo),
    st.builds(lambda x, a: lambda i: ev.DeviceGetRegionInfo(i, x, a), u32, st.integers(32, 4096)),
    st.builds(lambda x: lambda i: ev.DeviceGetRegionIoFds(i, x), u32),
    st.builds(lambda x: lambda i: ev.DeviceGetIrqInfo(i, x), u32),
    st.builds(lambda x, s, n: lambda i: ev.DeviceSetIrqs(i, 0x21, x, s, n),
              st.integers(0, 4), st.integers(0, 100), st.integers(0, 100)),
    st.builds(lambda x, d: lambda i: ev.DeviceSetIrqs(i, 0x0A, x, 0, len(d), d),
              st.integers(0, 4), st.binary(max_size=8)),
    st.builds(lambda o, r, n: lambda i: ev.RegionRead(i, o, r, n), u64, u32,
              st.integers(1, 4096)),
    st.builds(lambda o, r, d, p: lambda i: ev.RegionWrite(i, o, r, d, p),
              u64, u32, data_st, st.booleans()),
    st.builds(lambda ws, p: lambda i: ev.RegionWriteMulti(i, tuple(ws), p),
              st.lists(st.builds(ev.WriteEntry, u64, u32, st.binary(min_size=1, max_size=8)),
                       min_size=1, max_size=5), st.booleans()),
    st.just(ev.DeviceReset),
    st.builds(lambda f, d: lambda i: ev.DeviceFeature(i, f, d, 8 + len(d)), u32, data_st),
    st.builds(lambda s: lambda i: ev.MigDataRead(i, s), u32),
    st.builds(lambda d: lambda i: ev.MigDataWrite(i, d), data_st),
)  # fmt: skip


@FUZZ
@given(
    makers=st.lists(request_st, min_size=1, max_size=10),
    cuts=st.lists(st.integers(1, 2000), max_size=12),
    pull_between=st.booleans(),
)
def test_any_chunking_of_valid_requests_gives_the_same_events(
    makers: list[Callable[[int], Any]], cuts: list[int], pull_between: bool
) -> None:
    client, _ = negotiated_pair(client_caps=SMALL, server_caps=SMALL)
    sent = [make(client.next_msg_id()) for make in makers]
    stream = b"".join(client.send(event).data for event in sent)

    def decode(chunks: list[bytes]) -> list[Any]:
        _, server = negotiated_pair(client_caps=SMALL, server_caps=SMALL)
        events: list[Any] = []
        for i, chunk in enumerate(chunks):
            server.receive_data(chunk)
            while pull_between or i == len(chunks) - 1:
                event = server.next_event()
                if event is NEED_DATA:
                    break
                events.append(event)
        server.receive_data(b"")
        while (event := server.next_event()) is not CLOSED:
            events.append(event)
        return events

    whole = decode([stream])
    assert whole == sent
    assert decode(split(stream, cuts)) == whole
    assert decode([stream[i : i + 1] for i in range(len(stream))]) == whole


# ---------------------------------------------------------------- (c) capabilities JSON

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
CAP_KEYS = [
    "max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes", "write_multiple",
    "migration", "twin_socket", "x-unknown",
]  # fmt: skip
caps_objects = st.dictionaries(
    st.sampled_from(CAP_KEYS) | st.text(max_size=6), json_values, max_size=6
)
good_values = {
    "max_msg_fds": st.integers(0, 64),
    "max_data_xfer_size": st.integers(0, 1 << 30),
    "max_dma_maps": st.integers(0, 1 << 20),
    "pgsizes": st.sampled_from([0, 4096, 4096 | 1 << 21, 1 << 21, 8192]),
    "write_multiple": st.booleans(),
}
mostly_good_caps = st.fixed_dictionaries(
    {}, optional={k: v | json_values for k, v in good_values.items()}
)
documents = st.one_of(
    json_values,
    st.fixed_dictionaries({"capabilities": caps_objects | mostly_good_caps | json_values}),
    st.fixed_dictionaries({"capabilities": mostly_good_caps, "extra": json_values}),
)


@FUZZ
@given(doc=documents, minor=u16)
def test_capabilities_json_parses_or_raises_protocol_error(doc: Any, minor: int) -> None:
    blob = json.dumps(doc).encode() + b"\0"
    try:
        caps, keys = parse_capabilities(blob)
    except ProtocolError as exc:
        assert not exc.fatal
        parsed = False
    except Exception as exc:
        raise AssertionError(f"{type(exc).__name__} escaped: {exc!r}") from exc
    else:
        parsed = True
        assert isinstance(caps, Capabilities)
        assert isinstance(doc, dict)
        assert keys == frozenset(doc.get("capabilities", {}))
    # The same through a server and back to a client.
    server = ServerConnection()
    payload = struct.pack("<HH", 0, minor) + blob
    server.receive_data(struct.pack("<HHIII", 0, 1, 16 + len(payload), 0, 0) + payload)
    request = server.next_event()
    if not parsed:
        assert isinstance(request, ev.BadRequest)
        return
    assert isinstance(request, ev.VersionRequest)
    reply = server.version_reply(request)
    out = server.send(reply)
    if isinstance(reply, ev.ErrorReply):
        return
    json_reply = json.loads(out.data[20:-1])
    assert set(json_reply["capabilities"]) <= set(request.keys)
    client = ClientConnection()
    client.send(ev.VersionRequest(0, 0, 0))
    client.receive_data(out.data)
    got = client.next_event()
    assert isinstance(got, ev.VersionReply)
    assert got.major == 0 and got.minor <= minor
