"""Malformed vfio-user input: refused with the right errno (stream intact) or fatal.

A refused request (`BadRequest`) must leave the stream usable: every such test feeds a valid
request afterwards and checks it still decodes. Fds that came with a refused message are closed
by the connection: checked with os.fstat right after.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import struct
from collections.abc import Iterator
from typing import Any, cast

import pytest

from devmodel.testing import (
    QEMU_VERSION_JSON,
    FdBag,
    drain,
    expect_fatal,
    fd_is_open,
    negotiated_pair,
    one_event,
    posted,
    raw,
    raw_reply,
    ready_server,
    region_read,
    state,
)
from pyvfio_user import codec
from pyvfio_user import constants as c
from pyvfio_user import events as ev
from pyvfio_user.connection import (
    MSG_OVERHEAD,
    ClientConnection,
    ServerConnection,
    State,
)
from pyvfio_user.constants import Command
from pyvfio_user.errors import ProtocolError
from pyvfio_user.sansio import CLOSED, NEED_DATA
from pyvfio_user.version import Capabilities

SMALL = Capabilities(
    max_msg_fds=4, max_data_xfer_size=4096, max_dma_maps=16, pgsizes=4096, write_multiple=True
)
VERSION_PAYLOAD = b"\0\0\0\0" + QEMU_VERSION_JSON + b"\0"


@pytest.fixture
def bag() -> Iterator[FdBag]:
    fds = FdBag()
    yield fds
    fds.close_all()


def assert_stream_continues(server: ServerConnection) -> None:
    """A valid message after the bad one still decodes."""
    if state(server) is State.READY:
        server.receive_data(region_read(0x4242, 0x10, 7, 4))
        assert one_event(server) == ev.RegionRead(0x4242, 0x10, 7, 4)
    else:
        server.receive_data(raw(0x4242, Command.VERSION, VERSION_PAYLOAD))
        got = one_event(server)
        assert isinstance(got, ev.VersionRequest) and got.msg_id == 0x4242


def refused(
    server: ServerConnection, data: bytes, err: int, fds: list[int] | None = None
) -> ev.BadRequest:
    """Feed one message; it must come back as BadRequest(err), its fds closed, stream intact."""
    fds = fds or []
    server.receive_data(data, fds)
    bad = one_event(server)
    assert isinstance(bad, ev.BadRequest), bad
    assert bad.errno == err, bad.reason
    msg_id, command, _size, flags, _err = c.HEADER.unpack_from(data)
    assert (bad.msg_id, bad.command) == (msg_id, command)
    assert bad.no_reply == bool(flags & c.FLAG_NO_REPLY)
    for fd in fds:
        assert not fd_is_open(fd), f"fd {fd} of a refused message was left open"
    if not bad.no_reply:
        out = server.send(ev.ErrorReply(bad.msg_id, bad.command, bad.errno))
        assert out.data == struct.pack("<HHIII", msg_id, command, 16, 0x21, err)
    assert_stream_continues(server)
    return bad


# ---------------------------------------------------------------- framing: fatal


@pytest.mark.parametrize("size", [0, 1, 15])
def test_size_below_header_is_fatal(size: int) -> None:
    server = ready_server()
    exc = expect_fatal(server, raw(1, Command.REGION_READ, size=size) + bytes(32))
    assert "16-byte header" in str(exc)
    assert state(server) is State.BROKEN


def test_size_above_limit_is_fatal() -> None:
    server = ready_server(SMALL)
    limit = SMALL.max_data_xfer_size + MSG_OVERHEAD
    # Exactly at the limit is framed (it merely waits for its bytes)...
    server.receive_data(raw(1, Command.REGION_WRITE, size=limit))
    assert server.next_event() is NEED_DATA
    # ...one byte more is not, even before any payload arrives.
    server = ready_server(SMALL)
    expect_fatal(server, raw(1, Command.REGION_WRITE, size=limit + 1))
    expect_fatal(ready_server(), raw(1, Command.REGION_WRITE, size=0xFFFF_FFFF))


@pytest.mark.parametrize("kind", range(2, 16))
def test_type_bits_2_to_15_are_fatal(kind: int, bag: FdBag) -> None:
    server = ready_server()
    r, _ = bag.pipe()
    server.receive_data(raw(1, Command.REGION_READ, bytes(16), flags=kind), [r])
    with pytest.raises(ProtocolError) as info:
        server.next_event()
    assert info.value.fatal
    assert not fd_is_open(r)
    client, _ = negotiated_pair()
    expect_fatal(client, raw(1, Command.DMA_READ, struct.pack("<QQ", 0, 4), flags=kind))


def test_after_a_fatal_error_nothing_more_is_parsed(bag: FdBag) -> None:
    server = ready_server()
    expect_fatal(server, raw(1, 9, size=3))
    # Whatever arrives afterwards is dropped, its fds closed; no event ever comes out.
    r, _ = bag.pipe()
    server.receive_data(region_read(2), [r])
    assert not fd_is_open(r)
    with pytest.raises(ProtocolError):
        server.next_event()
    server.receive_data(b"")
    with pytest.raises(ProtocolError):
        server.next_event()


# ---------------------------------------------------------------- stream end


@pytest.mark.parametrize("cut", [1, 15, 16, 20, 31])
def test_stream_ending_mid_message_is_fatal(cut: int, bag: FdBag) -> None:
    server = ready_server()
    message = region_read(1)
    server.receive_data(message + message[:cut])
    r, _ = bag.pipe()
    server.receive_data(b"", [r])  # fds that come with the end are closed
    assert not fd_is_open(r)
    assert isinstance(server.next_event(), ev.RegionRead)
    with pytest.raises(ProtocolError) as info:
        server.next_event()
    assert info.value.fatal
    # Then it stays closed: no event, further input ignored, its fds closed.
    w = bag.eventfd()
    server.receive_data(region_read(3), [w])
    assert not fd_is_open(w)
    for _ in range(2):
        with pytest.raises(ProtocolError):
            server.next_event()


def test_stream_ending_mid_message_closes_its_fds(bag: FdBag) -> None:
    server = ready_server()
    message = raw(1, Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0, 4096))
    r, _ = bag.pipe()
    server.receive_data(message[:40], [r])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(ProtocolError):
        server.next_event()
    assert not fd_is_open(r)


def test_client_stream_ending_mid_reply_is_fatal() -> None:
    client, server = negotiated_pair()
    server.receive_data(client.send(ev.RegionRead(7, 0, 0, 4)).data)
    one_event(server)
    reply = server.send(ev.RegionReadReply(7, 0, 0, b"abcd")).data
    client.receive_data(reply[:-1])
    assert client.next_event() is NEED_DATA
    client.receive_data(b"")
    with pytest.raises(ProtocolError):
        client.next_event()


def test_eof_after_complete_messages_is_closed(bag: FdBag) -> None:
    server = ready_server()
    server.receive_data(region_read(1) + region_read(2))
    server.receive_data(b"")
    assert [e.msg_id for e in drain(server)] == [1, 2]
    assert server.next_event() is CLOSED
    assert state(server) is State.CLOSED
    r, _ = bag.pipe()
    server.receive_data(b"", [r])
    assert not fd_is_open(r)
    assert server.next_event() is CLOSED


def test_data_after_eof_is_fatal() -> None:
    server = ready_server()
    server.receive_data(b"")
    with pytest.raises(ProtocolError):
        server.receive_data(region_read(1))


def test_close_drops_buffered_fds(bag: FdBag) -> None:
    server = ready_server()
    r, _ = bag.pipe()
    server.receive_data(region_read(1)[:10], [r])
    server.close()
    assert not fd_is_open(r)
    assert server.next_event() is CLOSED


# ---------------------------------------------------------------- unknown and misdirected


@pytest.mark.parametrize("command", [0, 14, 19, 100, 0xFFFF])
def test_unknown_command_is_enosys(command: int) -> None:
    refused(ready_server(), raw(3, command, b"whatever"), errno.ENOSYS)


def test_unknown_command_before_version_is_enosys() -> None:
    refused(ServerConnection(), raw(3, 14), errno.ENOSYS)


@pytest.mark.parametrize("command", [Command.DMA_READ, Command.DMA_WRITE])
def test_dma_request_from_client_is_einval(command: Command) -> None:
    refused(ready_server(), raw(3, command, struct.pack("<QQ", 0, 4)), errno.EINVAL)


@pytest.mark.parametrize("flags", [0x40, 1 << 31, c.FLAG_ERROR])
def test_unknown_command_flags_are_einval(flags: int) -> None:
    refused(ready_server(), raw(3, 9, struct.pack("<QII", 0, 7, 4), flags=flags), errno.EINVAL)


def test_unsolicited_reply_is_fatal() -> None:
    expect_fatal(ready_server(), raw_reply(1, Command.DMA_READ, struct.pack("<QQ", 0, 0)))
    expect_fatal(ready_server(), raw_reply(1, Command.REGION_READ, bytes(16)))
    expect_fatal(ServerConnection(), raw_reply(0, Command.VERSION, b"\0\0\0\0"))


def test_reply_with_wrong_command_is_fatal() -> None:
    _, server = negotiated_pair()
    request = ev.DmaRead(server.next_msg_id(), 0, 4)
    server.send(request)
    expect_fatal(server, raw_reply(request.msg_id, Command.DMA_WRITE, bytes(12)))


def test_client_unsolicited_reply_is_fatal() -> None:
    client, _ = negotiated_pair()
    expect_fatal(client, raw_reply(99, Command.REGION_READ, struct.pack("<QII", 0, 0, 0)))
    client, _ = negotiated_pair()
    client.send(ev.RegionRead(5, 0, 0, 4))
    expect_fatal(client, raw_reply(5, Command.REGION_WRITE, struct.pack("<QII", 0, 0, 4)))


def test_client_refuses_server_requests_other_than_dma(bag: FdBag) -> None:
    client, _ = negotiated_pair()
    r, _w = bag.pipe()
    client.receive_data(raw(8, Command.REGION_READ, struct.pack("<QII", 0, 0, 4)), [r])
    bad = one_event(client)
    assert isinstance(bad, ev.BadRequest) and bad.errno == errno.EINVAL
    assert not fd_is_open(r)
    client.send(ev.ErrorReply(8, Command.REGION_READ, errno.EINVAL))
    with pytest.raises(ProtocolError):
        client.send(ev.ErrorReply(8, Command.REGION_READ, errno.EINVAL))


@pytest.mark.parametrize(
    ("command", "payload", "err"),
    [
        (Command.DMA_READ, struct.pack("<QQ", 0, 0), errno.EINVAL),
        (Command.DMA_READ, struct.pack("<QQ", 0, (1 << 20) + 1), errno.E2BIG),
        (Command.DMA_READ, struct.pack("<QQ", 0, 4) + b"x", errno.EINVAL),
        (Command.DMA_WRITE, struct.pack("<QQ", 0, 4) + b"abc", errno.EINVAL),
        (Command.DMA_WRITE, struct.pack("<Q", 0), errno.EINVAL),
    ],
)
def test_client_refuses_malformed_dma(command: Command, payload: bytes, err: int) -> None:
    client, _ = negotiated_pair()
    client.receive_data(raw(8, command, payload))
    bad = one_event(client)
    assert isinstance(bad, ev.BadRequest) and bad.errno == err
    # The stream goes on: a valid DMA_READ decodes.
    client.receive_data(raw(9, Command.DMA_READ, struct.pack("<QQ", 0x1000, 8)))
    assert one_event(client) == ev.DmaRead(9, 0x1000, 8)


# ---------------------------------------------------------------- state: VERSION first


def _valid_payloads() -> dict[Command, bytes]:
    """Valid request payloads, from a client's own encoder."""
    client, _ = negotiated_pair()
    events: list[Any] = [
        ev.DmaMap(0x100, 3, 0, 0x1000, 0x1000),
        ev.DmaUnmap(0x100, 0, 0x1000, 0x1000),
        ev.DeviceGetInfo(0x100),
        ev.DeviceGetRegionInfo(0x100, 0),
        ev.DeviceGetRegionIoFds(0x100, 0),
        ev.DeviceGetIrqInfo(0x100, 0),
        ev.DeviceSetIrqs(0x100, c.IRQ_SET_ACTION_TRIGGER | c.IRQ_SET_DATA_BOOL, 0, 0, 2, b"\1\0"),
        ev.RegionRead(0x100, 0, 7, 4),
        ev.RegionWrite(0x100, 0, 7, b"abcd"),
        ev.DeviceReset(0x100),
        ev.RegionWriteMulti(0x100, (ev.WriteEntry(0, 0, b"ab"),)),
        ev.DeviceFeature(0x100, c.DEVICE_FEATURE_PROBE | 1),
        ev.MigDataRead(0x100, 64),
        ev.MigDataWrite(0x100, b"abc"),
    ]
    out: dict[Command, bytes] = {}
    for i, event in enumerate(events):
        data = client.send(dataclasses.replace(event, msg_id=0x100 + i)).data
        out[Command(c.HEADER.unpack_from(data)[1])] = data[16:]
    return out


VALID = _valid_payloads()


@pytest.mark.parametrize("command", sorted(VALID))
def test_requests_before_version_are_einval(command: Command, bag: FdBag) -> None:
    server = ServerConnection()
    fds = [bag.memfd()] if command == Command.DMA_MAP else []
    bad = refused(server, raw(1, command, VALID[command]), errno.EINVAL, bag.travel(fds))
    assert "VERSION" in bad.reason


def test_requests_while_version_pending_are_einval() -> None:
    server = ServerConnection()
    server.receive_data(raw(0, Command.VERSION, VERSION_PAYLOAD))
    request = one_event(server)
    server.receive_data(region_read(1))
    bad = one_event(server)
    assert isinstance(bad, ev.BadRequest) and bad.errno == errno.EINVAL
    server.send(ev.ErrorReply(1, Command.REGION_READ, errno.EINVAL))
    # A second VERSION while the first is unanswered.
    server.receive_data(raw(2, Command.VERSION, VERSION_PAYLOAD))
    bad = one_event(server)
    assert isinstance(bad, ev.BadRequest) and bad.errno == errno.EINVAL
    server.send(ev.ErrorReply(2, Command.VERSION, errno.EINVAL))
    assert state(server) is State.VERSION_PENDING
    server.send(server.version_reply(request))
    assert_stream_continues(server)


def test_second_version_after_negotiation_is_einval() -> None:
    server = ready_server()
    bad = refused(server, raw(5, Command.VERSION, VERSION_PAYLOAD), errno.EINVAL)
    assert "already" in bad.reason
    assert state(server) is State.READY


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\0\0\0",
        b"\0\0\0\0{",
        b"\0\0\0\0{}",  # not NUL-terminated
        b"\0\0\0\0{}\0x",  # bytes after the NUL
        b"\0\0\0\0[]\0",
        b"\0\0\0\0\xff\xfe\0",
        b'\0\0\0\0{"capabilities":[]}\0',
        b'\0\0\0\0{"capabilities":{"max_msg_fds":-1}}\0',
        b'\0\0\0\0{"capabilities":{"max_msg_fds":1.5}}\0',
        b'\0\0\0\0{"capabilities":{"max_msg_fds":true}}\0',
        b'\0\0\0\0{"capabilities":{"pgsizes":18446744073709551616}}\0',
        b'\0\0\0\0{"capabilities":{"write_multiple":1}}\0',
        b"\0\0\0\0" + b"[" * 100000 + b"\0",
    ],
)
def test_bad_version_payload_is_einval(payload: bytes) -> None:
    server = ServerConnection()
    refused(server, raw(0, Command.VERSION, payload), errno.EINVAL)
    assert state(server) is State.VERSION_PENDING  # the valid VERSION after it was taken


def test_version_with_fds_is_refused(bag: FdBag) -> None:
    refused(ServerConnection(), raw(0, 1, VERSION_PAYLOAD), errno.EINVAL, [bag.eventfd()])


def test_version_reply_for_wrong_major_or_page_sizes() -> None:
    server = ServerConnection()
    server.receive_data(raw(0, Command.VERSION, b"\1\0\0\0"))
    reply = server.version_reply(one_event(server))
    assert reply == ev.ErrorReply(0, Command.VERSION, errno.ENOTSUP)
    server.send(reply)
    assert state(server) is State.AWAIT_VERSION
    payload = b'\0\0\0\0{"capabilities":{"pgsizes":8192}}\0'
    server.receive_data(raw(1, Command.VERSION, payload))
    reply = server.version_reply(one_event(server))
    assert reply == ev.ErrorReply(1, Command.VERSION, errno.EINVAL)


# ---------------------------------------------------------------- payload lengths, argsz


FIXED = [
    Command.DMA_MAP,
    Command.DMA_UNMAP,
    Command.DEVICE_GET_INFO,
    Command.DEVICE_GET_REGION_INFO,
    Command.DEVICE_GET_REGION_IO_FDS,
    Command.DEVICE_GET_IRQ_INFO,
    Command.DEVICE_SET_IRQS,  # argsz must equal the payload length
    Command.REGION_READ,
    Command.REGION_WRITE,  # count must equal the data length
    Command.DEVICE_RESET,
    Command.REGION_WRITE_MULTI,
    Command.MIG_DATA_READ,
    Command.MIG_DATA_WRITE,  # size must equal the data length
]


@pytest.mark.parametrize(
    ("command", "delta"),
    [(cmd, d) for cmd in FIXED for d in (-1, +1) if VALID[cmd] or d > 0],
)
def test_wrong_payload_length(command: Command, delta: int) -> None:
    payload = VALID[command]
    payload = payload[:-1] if delta < 0 else payload + b"\0"
    refused(ready_server(), raw(1, command, payload), errno.EINVAL)


@pytest.mark.parametrize(
    ("command", "length"),
    [
        (Command.VERSION, 3),
        (Command.DEVICE_SET_IRQS, 19),
        (Command.REGION_READ, 0),
        (Command.REGION_WRITE, 15),
        (Command.REGION_WRITE_MULTI, 7),
        (Command.DEVICE_FEATURE, 7),
        (Command.MIG_DATA_WRITE, 7),
        (Command.DMA_MAP, 0),
    ],
)
def test_truncated_fixed_part(command: Command, length: int) -> None:
    server = ServerConnection() if command == Command.VERSION else ready_server()
    base = VERSION_PAYLOAD if command == Command.VERSION else VALID[command]
    refused(server, raw(1, command, base[:length]), errno.EINVAL)


ARGSZ_MIN = {
    Command.DMA_MAP: 32,
    Command.DMA_UNMAP: 24,
    Command.DEVICE_GET_INFO: 16,
    Command.DEVICE_GET_REGION_INFO: 32,
    Command.DEVICE_GET_REGION_IO_FDS: 16,
    Command.DEVICE_GET_IRQ_INFO: 16,
    Command.DEVICE_FEATURE: 8,
    Command.MIG_DATA_READ: 8,
}


@pytest.mark.parametrize("command", sorted(ARGSZ_MIN))
@pytest.mark.parametrize("argsz", [0, -1])
def test_argsz_below_minimum(command: Command, argsz: int) -> None:
    value = ARGSZ_MIN[command] - 1 if argsz < 0 else 0
    payload = struct.pack("<I", value) + VALID[command][4:]
    refused(ready_server(), raw(1, command, payload), errno.EINVAL)


@pytest.mark.parametrize("argsz", [0, 19, 21, 23, 0xFFFF_FFFF])
def test_set_irqs_argsz_must_match_payload(argsz: int) -> None:
    payload = struct.pack("<I", argsz) + VALID[Command.DEVICE_SET_IRQS][4:]
    refused(ready_server(), raw(1, Command.DEVICE_SET_IRQS, payload), errno.EINVAL)


def test_larger_argsz_is_accepted() -> None:
    """A client may offer room for more than the fixed struct (QEMU does for region info)."""
    server = ready_server()
    payload = struct.pack("<I", 4096) + VALID[Command.DEVICE_GET_REGION_INFO][4:]
    server.receive_data(raw(1, Command.DEVICE_GET_REGION_INFO, payload))
    assert one_event(server) == ev.DeviceGetRegionInfo(1, 0, argsz=4096)


# ---------------------------------------------------------------- region access counts


def test_region_read_count_zero() -> None:
    refused(ready_server(), region_read(1, 0, 0, 0), errno.EINVAL)


def test_region_read_count_over_max_is_e2big() -> None:
    refused(ready_server(SMALL), region_read(1, 0, 0, 4097), errno.E2BIG)
    refused(ready_server(), region_read(1, 0, 0, (1 << 20) + 1), errno.E2BIG)
    refused(ready_server(), region_read(1, 0, 0, 0xFFFF_FFFF), errno.E2BIG)


def test_region_read_count_at_max_is_accepted() -> None:
    server = ready_server(SMALL)
    server.receive_data(region_read(1, 0, 0, 4096))
    assert one_event(server) == ev.RegionRead(1, 0, 0, 4096)


@pytest.mark.parametrize(("count", "data"), [(4, b"abc"), (4, b"abcde"), (1, b""), (2, b"\0" * 8)])
def test_region_write_count_mismatch(count: int, data: bytes) -> None:
    payload = struct.pack("<QII", 0, 0, count) + data
    refused(ready_server(), raw(1, Command.REGION_WRITE, payload), errno.EINVAL)


def test_region_write_count_zero_and_over_max() -> None:
    refused(ready_server(), raw(1, 10, struct.pack("<QII", 0, 0, 0)), errno.EINVAL)
    over = struct.pack("<QII", 0, 0, 4097) + bytes(4097)
    refused(ready_server(SMALL), raw(1, 10, over), errno.E2BIG)


@pytest.mark.parametrize(
    "payload",
    [
        struct.pack("<Q", 0),  # no entries
        struct.pack("<Q", 2) + struct.pack("<QII8s", 0, 0, 4, b"abcd"),  # fewer than said
        struct.pack("<Q", 1) + struct.pack("<QII8s", 0, 0, 0, b""),  # count 0
        struct.pack("<Q", 1) + struct.pack("<QII8s", 0, 0, 9, b""),  # count over 8
        struct.pack("<Q", 1 << 60) + struct.pack("<QII8s", 0, 0, 4, b""),
    ],
)
def test_write_multi_malformed(payload: bytes) -> None:
    refused(ready_server(), raw(1, Command.REGION_WRITE_MULTI, payload), errno.EINVAL)


# ---------------------------------------------------------------- SET_IRQS

A, D = c.IRQ_SET_ACTION_TRIGGER, c.IRQ_SET_DATA_EVENTFD


def set_irqs(flags: int, count: int, data: bytes = b"", start: int = 0) -> bytes:
    payload = struct.pack("<IIIII", 20 + len(data), flags, 0, start, count) + data
    return raw(1, Command.DEVICE_SET_IRQS, payload)


@pytest.mark.parametrize(
    "flags",
    [
        A | c.IRQ_SET_DATA_NONE | c.IRQ_SET_DATA_BOOL,  # two data types
        A | c.IRQ_SET_DATA_NONE | c.IRQ_SET_DATA_EVENTFD,
        c.IRQ_SET_DATA_NONE,  # no action
        A,  # no data type
        c.IRQ_SET_ACTION_MASK | c.IRQ_SET_ACTION_UNMASK | c.IRQ_SET_DATA_NONE,  # two actions
        A | c.IRQ_SET_DATA_NONE | 1 << 6,  # unknown bit
        0,
    ],
)
def test_set_irqs_bad_flags(flags: int) -> None:
    refused(ready_server(), set_irqs(flags, 1), errno.EINVAL)


@pytest.mark.parametrize(("count", "data"), [(3, b"\1\1"), (1, b"\1\1"), (0, b"\1")])
def test_set_irqs_bool_length_mismatch(count: int, data: bytes) -> None:
    refused(ready_server(), set_irqs(A | c.IRQ_SET_DATA_BOOL, count, data), errno.EINVAL)


def test_set_irqs_data_with_eventfd_or_none() -> None:
    refused(ready_server(), set_irqs(A | D, 1, b"\1"), errno.EINVAL)
    refused(ready_server(), set_irqs(A | c.IRQ_SET_DATA_NONE, 1, b"\1"), errno.EINVAL)


def test_set_irqs_fds_with_data_none(bag: FdBag) -> None:
    fds = [bag.eventfd()]
    refused(ready_server(), set_irqs(A | c.IRQ_SET_DATA_NONE, 1), errno.EINVAL, fds)


def test_set_irqs_fds_with_data_bool(bag: FdBag) -> None:
    fds = [bag.eventfd()]
    refused(ready_server(), set_irqs(A | c.IRQ_SET_DATA_BOOL, 1, b"\1"), errno.EINVAL, fds)


@pytest.mark.parametrize(("count", "nfds"), [(2, 1), (1, 2), (3, 4)])
def test_set_irqs_fd_count_mismatch(count: int, nfds: int, bag: FdBag) -> None:
    fds = [bag.eventfd() for _ in range(nfds)]
    refused(ready_server(), set_irqs(A | D, count), errno.EINVAL, fds)


def test_set_irqs_more_fds_than_max_msg_fds(bag: FdBag) -> None:
    fds = [bag.eventfd() for _ in range(5)]
    refused(ready_server(SMALL), set_irqs(A | D, 5), errno.EINVAL, fds)


def test_set_irqs_start_count_overflow() -> None:
    refused(ready_server(), set_irqs(A | c.IRQ_SET_DATA_NONE, 2, start=0xFFFF_FFFF), errno.EINVAL)


# ---------------------------------------------------------------- DMA_MAP / DMA_UNMAP


def test_dma_map_two_fds(bag: FdBag) -> None:
    fds = [bag.memfd(), bag.memfd()]
    refused(ready_server(), raw(1, Command.DMA_MAP, VALID[Command.DMA_MAP]), errno.EINVAL, fds)


@pytest.mark.parametrize(
    ("flags", "address", "size"),
    [(4, 0, 4096), (3, 0x1000, 0), (3, 0xFFFF_FFFF_FFFF_F000, 0x2000), (1 << 31, 0, 1)],
)
def test_dma_map_bad_fields(flags: int, address: int, size: int, bag: FdBag) -> None:
    payload = struct.pack("<IIQQQ", 32, flags, 0, address, size)
    refused(ready_server(), raw(1, Command.DMA_MAP, payload), errno.EINVAL, [bag.memfd()])


def test_dma_map_reaching_the_top_is_accepted() -> None:
    server = ready_server()
    payload = struct.pack("<IIQQQ", 32, 3, 0, 0xFFFF_FFFF_FFFF_F000, 0x1000)
    server.receive_data(raw(1, Command.DMA_MAP, payload))
    assert one_event(server) == ev.DmaMap(1, 3, 0, 0xFFFF_FFFF_FFFF_F000, 0x1000)


@pytest.mark.parametrize(
    ("flags", "address", "size"),
    [(1, 0, 4096), (c.DMA_UNMAP_ALL, 0x1000, 0), (c.DMA_UNMAP_ALL, 0, 1), (4, 0, 1)],
)
def test_dma_unmap_bad_fields(flags: int, address: int, size: int) -> None:
    payload = struct.pack("<IIQQ", 24, flags, address, size)
    refused(ready_server(), raw(1, Command.DMA_UNMAP, payload), errno.EINVAL)


def test_dma_unmap_with_fd(bag: FdBag) -> None:
    payload = VALID[Command.DMA_UNMAP]
    refused(ready_server(), raw(1, Command.DMA_UNMAP, payload), errno.EINVAL, [bag.memfd()])


def test_io_fds_flags_must_be_zero() -> None:
    payload = struct.pack("<IIII", 16, 1, 0, 0)
    refused(ready_server(), raw(1, Command.DEVICE_GET_REGION_IO_FDS, payload), errno.EINVAL)


# ---------------------------------------------------------------- fds where none belong


@pytest.mark.parametrize(
    "command", [cmd for cmd in sorted(VALID) if cmd not in (Command.DMA_MAP, 8)]
)
def test_fds_on_a_request_that_takes_none_are_closed(command: Command, bag: FdBag) -> None:
    fds = [bag.eventfd(), bag.memfd()]
    refused(ready_server(), raw(1, command, VALID[command]), errno.EINVAL, fds)


def test_fds_on_region_read_are_closed(bag: FdBag) -> None:
    r, w = bag.pipe()
    server = ready_server()
    server.receive_data(region_read(1, 0, 0, 4), [r, w])
    bad = one_event(server)
    assert isinstance(bad, ev.BadRequest) and bad.errno == errno.EINVAL
    for fd in (r, w):
        with pytest.raises(OSError):
            os.fstat(fd)
    assert_stream_continues(server)


# ---------------------------------------------------------------- NO_REPLY and replies


def test_bad_posted_request_must_not_be_answered() -> None:
    server = ready_server()
    bad = refused(
        server, posted(1, Command.REGION_WRITE, struct.pack("<QII", 0, 0, 4)), errno.EINVAL
    )
    assert bad.no_reply
    with pytest.raises(ProtocolError):
        server.send(ev.ErrorReply(1, Command.REGION_WRITE, errno.EINVAL))
    bad = refused(server, posted(2, 14, b""), errno.ENOSYS)
    assert bad.no_reply
    with pytest.raises(ProtocolError):
        server.send(ev.ErrorReply(2, 14, errno.ENOSYS))


def test_reply_to_posted_region_write_raises() -> None:
    client, server = negotiated_pair()
    server.receive_data(client.send(ev.RegionWrite(3, 0x40, 0, b"abcd", no_reply=True)).data)
    got = one_event(server)
    assert isinstance(got, ev.RegionWrite) and got.no_reply
    with pytest.raises(ProtocolError):
        server.send(ev.RegionWriteReply(3, 0x40, 0, 4))
    with pytest.raises(ProtocolError):
        server.send(ev.ErrorReply(3, Command.REGION_WRITE, errno.EIO))


def test_reply_to_posted_write_multi_raises() -> None:
    client, server = negotiated_pair()
    event = ev.RegionWriteMulti(3, (ev.WriteEntry(0, 0, b"a"),), no_reply=True)
    server.receive_data(client.send(event).data)
    one_event(server)
    with pytest.raises(ProtocolError):
        server.send(ev.RegionWriteMultiReply(3, 1))


def test_each_request_is_answered_once() -> None:
    client, server = negotiated_pair()
    server.receive_data(client.send(ev.RegionRead(3, 0, 0, 4)).data)
    one_event(server)
    with pytest.raises(ProtocolError):
        server.send(ev.RegionReadReply(4, 0, 0, b"abcd"))  # wrong id
    with pytest.raises(ProtocolError):
        server.send(ev.RegionWriteReply(3, 0, 0, 4))  # wrong command
    server.send(ev.RegionReadReply(3, 0, 0, b"abcd"))
    with pytest.raises(ProtocolError):
        server.send(ev.RegionReadReply(3, 0, 0, b"abcd"))


def test_same_id_reused_by_client_is_answered_per_request() -> None:
    """Ids wrap: two requests with the same id and command are owed two replies."""
    server = ready_server()
    server.receive_data(region_read(9) + region_read(9))
    assert len(drain(server)) == 2
    server.send(ev.RegionReadReply(9, 0, 7, b"abcd"))
    server.send(ev.RegionReadReply(9, 0, 7, b"abcd"))
    with pytest.raises(ProtocolError):
        server.send(ev.RegionReadReply(9, 0, 7, b"abcd"))


# ---------------------------------------------------------------- malformed replies: fatal


def _client_awaiting(request: Any) -> ClientConnection:
    client, _ = negotiated_pair()
    client.send(request)
    return client


@pytest.mark.parametrize(
    ("request_", "reply"),
    [
        (ev.DeviceGetInfo(1), raw_reply(1, 4, bytes(15))),
        (ev.DeviceGetIrqInfo(1, 0), raw_reply(1, 7, bytes(17))),
        (ev.RegionRead(1, 0, 0, 4), raw_reply(1, 9, struct.pack("<QII", 0, 0, 4) + b"abc")),
        (ev.RegionWrite(1, 0, 0, b"a"), raw_reply(1, 10, bytes(15))),
        (ev.DmaMap(1, 3, 0, 0, 4096), raw_reply(1, 2, b"x")),
        (ev.DeviceGetRegionInfo(1, 0), raw_reply(1, 5, bytes(31))),
        (ev.RegionWriteMulti(1, (ev.WriteEntry(0, 0, b"a"),)), raw_reply(1, 15, bytes(4))),
        (ev.MigDataRead(1, 4), raw_reply(1, 17, struct.pack("<II", 12, 4) + b"ab")),
        (ev.DeviceFeature(1, 0), raw_reply(1, 16, bytes(4))),
        (ev.VersionRequest(1, 0, 0), None),
        (ev.DeviceGetInfo(1), raw(1, 4, b"payload", flags=c.TYPE_REPLY | c.FLAG_ERROR)),
    ],
)
def test_malformed_reply_is_fatal(request_: Any, reply: bytes | None) -> None:
    if isinstance(request_, ev.VersionRequest):
        client = ClientConnection()
        client.send(request_)
        reply = raw_reply(1, 1, b'\0\0\0\0{"capabilities":7}\0')
    else:
        client = _client_awaiting(request_)
    assert reply is not None
    expect_fatal(client, reply)


@pytest.mark.parametrize(("major", "minor"), [(1, 0), (0, 1)])
def test_client_refuses_a_higher_version(major: int, minor: int) -> None:
    client = ClientConnection()
    client.send(ev.VersionRequest(0, 0, 0))
    expect_fatal(client, raw_reply(0, 1, struct.pack("<HH", major, minor) + b"{}\0"))


def _region_info_reply(flags: int, cap_offset: int, chain: bytes) -> bytes:
    info = struct.pack("<IIIIQQ", 32 + len(chain), flags, 2, cap_offset, 0x1000, 0)
    return raw_reply(1, Command.DEVICE_GET_REGION_INFO, info + chain)


@pytest.mark.parametrize(
    "reply",
    [
        _region_info_reply(3, 32, b""),  # cap_offset without CAPS
        _region_info_reply(8, 8, bytes(8)),  # cap inside the info
        _region_info_reply(8, 32, b""),  # cap beyond the end
        _region_info_reply(8, 32, struct.pack("<HHI", 1, 1, 32)),  # next points back at itself
        _region_info_reply(8, 32, struct.pack("<HHI", 1, 1, 0)),  # sparse body truncated
        _region_info_reply(8, 32, struct.pack("<HHIII", 1, 1, 0, 2, 0) + bytes(16)),  # 2 areas?
        _region_info_reply(8, 32, struct.pack("<HHI", 2, 1, 1000) + bytes(8)),  # next too far
    ],
)
def test_malformed_region_info_caps_are_fatal(reply: bytes) -> None:
    expect_fatal(_client_awaiting(ev.DeviceGetRegionInfo(1, 2, argsz=512)), reply)


def test_region_info_reply_with_two_fds_is_fatal(bag: FdBag) -> None:
    client = _client_awaiting(ev.DeviceGetRegionInfo(1, 2))
    fds = [bag.memfd(), bag.memfd()]
    client.receive_data(_region_info_reply(0, 0, b""), fds)
    with pytest.raises(ProtocolError):
        client.next_event()
    assert not any(fd_is_open(fd) for fd in fds)


def test_io_fds_reply_naming_a_missing_fd_is_fatal(bag: FdBag) -> None:
    client = _client_awaiting(ev.DeviceGetRegionIoFds(1, 0, argsz=64))
    payload = struct.pack("<IIII", 56, 0, 0, 1) + struct.pack("<QQIIIIQ", 0, 4, 1, 0, 0, 0, 0)
    fds = [bag.eventfd()]
    client.receive_data(raw_reply(1, Command.DEVICE_GET_REGION_IO_FDS, payload), fds)
    with pytest.raises(ProtocolError):
        client.next_event()
    assert not fd_is_open(fds[0])


def test_reply_decoders_cover_every_command() -> None:
    assert set(codec.REPLIES) == set(Command)
    assert set(codec.REQUESTS) == set(Command)


def test_posted_version_is_refused_and_negotiation_stays_open() -> None:
    """A VERSION with NO_REPLY cannot be answered; taking it would wedge the negotiation."""
    server = ServerConnection()
    bad = refused(server, posted(0, Command.VERSION, VERSION_PAYLOAD), errno.EINVAL)
    assert bad.no_reply
    # refused() fed a plain VERSION afterwards: it was taken, and it can be answered.
    reply = server.version_reply(ev.VersionRequest(0x4242, 0, 0))
    server.send(reply)
    assert state(server) is State.READY


def test_version_with_no_common_page_size_is_refused() -> None:
    server = ServerConnection()
    request = ev.VersionRequest(0, 0, 0, Capabilities(pgsizes=0), frozenset({"pgsizes"}))
    assert isinstance(server.version_reply(request), ev.ErrorReply)


def test_mig_data_write_with_short_argsz_is_refused() -> None:
    server = ServerConnection()
    server.receive_data(struct.pack("<HHIIIHH", 0, 1, 20, 0, 0, 0, 0))
    server.send(server.version_reply(cast(ev.VersionRequest, server.next_event())))
    payload = struct.pack("<II", 4, 2) + b"ab"
    server.receive_data(struct.pack("<HHIII", 7, 18, 16 + len(payload), 0, 0) + payload)
    event = server.next_event()
    assert isinstance(event, ev.BadRequest) and event.errno == errno.EINVAL
