"""vfio-user round trips: every request a client sends, every reply a server sends, and DMA.

Each message goes through the real encoders and the real sans-IO connections on both sides.
Where fds travel they are real (pipes, eventfds, memfds), duplicated as SCM_RIGHTS would.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from devmodel.testing import (
    QEMU_CAPS,
    QEMU_KEYS,
    FdBag,
    deliver,
    fd_is_open,
    negotiated_pair,
    one_event,
    state,
)
from pyvfio_user import constants as c
from pyvfio_user import events as ev
from pyvfio_user.connection import ClientConnection, ServerConnection, State
from pyvfio_user.constants import Command
from pyvfio_user.errors import ProtocolError
from pyvfio_user.sansio import CLOSED, NEED_DATA
from pyvfio_user.version import Capabilities


@pytest.fixture
def bag() -> Iterator[FdBag]:
    fds = FdBag()
    yield fds
    fds.close_all()


# ---------------------------------------------------------------- requests, client to server

IRQ_TRIGGER_EVENTFD = c.IRQ_SET_ACTION_TRIGGER | c.IRQ_SET_DATA_EVENTFD

RequestFactory = Callable[[int, FdBag], Any]

REQUESTS: dict[str, RequestFactory] = {
    "dma_map_no_fd": lambda i, b: ev.DmaMap(i, c.DMA_READ_FLAG, 0, 0xC0000, 0x20000),
    "dma_map_fd": lambda i, b: ev.DmaMap(
        i, c.DMA_READ_FLAG | c.DMA_WRITE_FLAG, 0x1000, 0x100000000, 0x40000000, b.memfd()
    ),
    "dma_unmap": lambda i, b: ev.DmaUnmap(i, 0, 0x100000000, 0x40000000),
    "dma_unmap_all": lambda i, b: ev.DmaUnmap(i, c.DMA_UNMAP_ALL, 0, 0),
    "get_info": lambda i, b: ev.DeviceGetInfo(i),
    "get_region_info": lambda i, b: ev.DeviceGetRegionInfo(i, 7),
    "get_region_info_big_argsz": lambda i, b: ev.DeviceGetRegionInfo(i, 2, argsz=88),
    "get_region_io_fds": lambda i, b: ev.DeviceGetRegionIoFds(i, 0, argsz=256),
    "get_irq_info": lambda i, b: ev.DeviceGetIrqInfo(i, 3),
    "set_irqs_none": lambda i, b: ev.DeviceSetIrqs(
        i, c.IRQ_SET_ACTION_TRIGGER | c.IRQ_SET_DATA_NONE, 0, 0, 1
    ),
    "set_irqs_bool": lambda i, b: ev.DeviceSetIrqs(
        i, c.IRQ_SET_ACTION_MASK | c.IRQ_SET_DATA_BOOL, 2, 4, 3, data=b"\x01\x00\x01"
    ),
    "set_irqs_eventfd": lambda i, b: ev.DeviceSetIrqs(
        i, IRQ_TRIGGER_EVENTFD, 0, 0, 1, fds=(b.eventfd(),)
    ),
    "set_irqs_eventfd_many": lambda i, b: ev.DeviceSetIrqs(
        i, IRQ_TRIGGER_EVENTFD, 2, 0, 3, fds=(b.eventfd(), b.eventfd(), b.eventfd())
    ),
    "set_irqs_eventfd_deassign": lambda i, b: ev.DeviceSetIrqs(i, IRQ_TRIGGER_EVENTFD, 0, 0, 1),
    "region_read": lambda i, b: ev.RegionRead(i, 0x10, 7, 4),
    "region_read_big": lambda i, b: ev.RegionRead(i, 0, 0, 1 << 20),
    "region_write": lambda i, b: ev.RegionWrite(i, 0x04, 7, b"\x06\x01"),
    "region_write_posted": lambda i, b: ev.RegionWrite(
        i, 0x1000, 0, b"\x01\x02\x03\x04\x05\x06\x07\x08", no_reply=True
    ),
    "write_multi": lambda i, b: ev.RegionWriteMulti(
        i, (ev.WriteEntry(0x0, 0, b"\xaa"), ev.WriteEntry(0x8, 0, b"12345678"))
    ),
    "write_multi_posted": lambda i, b: ev.RegionWriteMulti(
        i,
        tuple(ev.WriteEntry(8 * k, 2, bytes([k]) * 4) for k in range(200)),
        no_reply=True,
    ),
    "reset": lambda i, b: ev.DeviceReset(i),
    "feature": lambda i, b: ev.DeviceFeature(
        i, c.DEVICE_FEATURE_PROBE | c.DEVICE_FEATURE_GET | 3, b"\x01\x02", argsz=10
    ),
    "mig_data_read": lambda i, b: ev.MigDataRead(i, 4096, argsz=8 + 4096),
    "mig_data_write": lambda i, b: ev.MigDataWrite(i, b"state" * 10),
}


def _with_received_fds(sent: Any, received: list[int]) -> Any:
    """`sent` as the receiver should see it: the same, but holding the received fds."""
    if isinstance(sent, ev.DmaMap):
        return dataclasses.replace(sent, fd=received[0] if received else None)
    if isinstance(sent, ev.DeviceSetIrqs):
        return dataclasses.replace(sent, fds=tuple(received))
    assert not received
    return sent


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_request_round_trip(name: str, bag: FdBag) -> None:
    client, server = negotiated_pair()
    request = REQUESTS[name](client.next_msg_id(), bag)
    travelled = deliver(client.send(request), server, bag)
    got = one_event(server)
    assert got == _with_received_fds(request, travelled)
    for fd in travelled:
        assert fd_is_open(fd), "an fd handed out in an event must stay open"
    assert server.next_event() is NEED_DATA


def test_request_fds_are_the_ones_sent(bag: FdBag) -> None:
    """The fd in the event is the received one and refers to the sender's file."""
    client, server = negotiated_pair()
    r, w = bag.pipe()
    out = client.send(ev.DmaMap(client.next_msg_id(), c.DMA_READ_FLAG, 0, 0, 4096, w))
    assert out.fds == (w,)
    (received,) = deliver(out, server, bag)
    got = one_event(server)
    assert isinstance(got, ev.DmaMap)
    assert got.fd == received
    os.write(got.fd, b"x")
    assert os.read(r, 1) == b"x"


def test_version_request_round_trip() -> None:
    client, server = ClientConnection(QEMU_CAPS), ServerConnection()
    request = ev.VersionRequest(client.next_msg_id(), 0, 0, QEMU_CAPS, no_reply=False)
    server.receive_data(client.send(request).data)
    got = one_event(server)
    assert isinstance(got, ev.VersionRequest)
    # The sender's own event leaves keys empty; the receiver learns which keys were named.
    assert got == dataclasses.replace(request, keys=QEMU_KEYS)
    assert state(client) is State.VERSION_PENDING
    assert state(server) is State.VERSION_PENDING


def test_version_request_without_json() -> None:
    server = ServerConnection()
    server.receive_data(struct.pack("<HHIII", 5, 1, 20, 0, 0) + b"\0\0\0\0")
    got = one_event(server)
    assert got == ev.VersionRequest(5, 0, 0, Capabilities(), frozenset())
    reply = server.version_reply(got)
    data = server.send(reply).data
    assert data[20:] == b'{"capabilities":{}}\0'


# ---------------------------------------------------------------- replies, server to client


def _exchange(client: ClientConnection, server: ServerConnection, request: Any, bag: FdBag) -> Any:
    """Client sends `request`; the server decodes it (and returns the decoded event)."""
    deliver(client.send(request), server, bag)
    got = one_event(server)
    assert type(got) is type(request)
    return got


def _reply_round_trip(request: Any, reply: Any, expected: Any, bag: FdBag) -> Any:
    client, server = negotiated_pair()
    _exchange(client, server, request, bag)
    travelled = deliver(server.send(reply), client, bag)
    got = one_event(client)
    want = expected(travelled) if callable(expected) else expected
    assert got == want
    assert client.next_event() is NEED_DATA
    return got


SPARSE = ev.SparseMmapCap(((0, 0x1000), (0x3000, 0x2000)))
TYPE_CAP = ev.RawRegionCap(c.REGION_INFO_CAP_TYPE, 1, struct.pack("<II", 0x80000000, 1))
BAR_FLAGS = c.REGION_INFO_FLAG_READ | c.REGION_INFO_FLAG_WRITE | c.REGION_INFO_FLAG_MMAP
# 32 bytes of info, then sparse (8 header + 8 fixed + 2 * 16 areas) and type (8 + 8).
CHAIN_ARGSZ = 32 + 48 + 16


def test_version_reply_round_trip() -> None:
    client = ClientConnection(QEMU_CAPS)
    server = ServerConnection()
    request = _exchange(client, server, ev.VersionRequest(0, 0, 0, QEMU_CAPS), FdBag())
    reply = server.version_reply(request)
    assert isinstance(reply, ev.VersionReply)
    client.receive_data(server.send(reply).data)
    got = one_event(client)
    assert isinstance(got, ev.VersionReply)
    assert (got.msg_id, got.major, got.minor) == (0, 0, 0)
    assert got.keys is not None
    assert got.keys <= QEMU_KEYS
    assert got.capabilities == dataclasses.replace(reply.capabilities, extra=())
    assert state(client) is State.READY and state(server) is State.READY
    assert client.server == got.capabilities


@pytest.mark.parametrize(
    ("request_", "reply", "expected"),
    [
        pytest.param(
            ev.DmaMap(1, 3, 0, 0, 4096),
            ev.Ack(1, Command.DMA_MAP),
            ev.Ack(1, Command.DMA_MAP),
            id="ack-dma-map",
        ),
        pytest.param(
            ev.DeviceSetIrqs(1, IRQ_TRIGGER_EVENTFD, 0, 0, 1),
            ev.Ack(1, Command.DEVICE_SET_IRQS),
            ev.Ack(1, Command.DEVICE_SET_IRQS),
            id="ack-set-irqs",
        ),
        pytest.param(
            ev.DeviceReset(1),
            ev.Ack(1, Command.DEVICE_RESET),
            ev.Ack(1, Command.DEVICE_RESET),
            id="ack-reset",
        ),
        pytest.param(
            ev.DmaUnmap(1, 0, 0x1000, 0x2000),
            ev.DmaUnmapReply(1, 0, 0x1000, 0x2000),
            ev.DmaUnmapReply(1, 0, 0x1000, 0x2000),
            id="dma-unmap",
        ),
        pytest.param(
            ev.DmaUnmap(1, c.DMA_UNMAP_ALL, 0, 0),
            ev.DmaUnmapReply(1, c.DMA_UNMAP_ALL, 0, 0),
            ev.DmaUnmapReply(1, c.DMA_UNMAP_ALL, 0, 0),
            id="dma-unmap-all",
        ),
        pytest.param(
            ev.DeviceGetInfo(1),
            ev.DeviceInfo(1, c.DEVICE_FLAGS_PCI | c.DEVICE_FLAGS_RESET, 9, 5),
            ev.DeviceInfo(1, c.DEVICE_FLAGS_PCI | c.DEVICE_FLAGS_RESET, 9, 5),
            id="device-info",
        ),
        pytest.param(
            ev.DeviceGetRegionInfo(1, 7),
            ev.RegionInfo(1, 7, 3, 4096),
            ev.RegionInfo(1, 7, 3, 4096),
            id="region-info-plain",
        ),
        pytest.param(
            ev.DeviceGetIrqInfo(1, 3),
            ev.IrqInfo(1, 3, c.IRQ_INFO_EVENTFD | c.IRQ_INFO_NORESIZE, 1),
            ev.IrqInfo(1, 3, c.IRQ_INFO_EVENTFD | c.IRQ_INFO_NORESIZE, 1),
            id="irq-info",
        ),
        pytest.param(
            ev.RegionRead(1, 0, 7, 8),
            ev.RegionReadReply(1, 0, 7, b"\xf4\x1a\xf0\x10\x07\x00\x10\x00"),
            ev.RegionReadReply(1, 0, 7, b"\xf4\x1a\xf0\x10\x07\x00\x10\x00"),
            id="region-read",
        ),
        pytest.param(
            ev.RegionWrite(1, 4, 7, b"\x07\x00"),
            ev.RegionWriteReply(1, 4, 7, 2),
            ev.RegionWriteReply(1, 4, 7, 2),
            id="region-write",
        ),
        pytest.param(
            ev.RegionWriteMulti(1, (ev.WriteEntry(0, 0, b"ab"), ev.WriteEntry(8, 0, b"c"))),
            ev.RegionWriteMultiReply(1, 2),
            ev.RegionWriteMultiReply(1, 2),
            id="write-multi",
        ),
        pytest.param(
            ev.DeviceFeature(1, c.DEVICE_FEATURE_GET | 2, argsz=16),
            ev.DeviceFeatureReply(1, c.DEVICE_FEATURE_GET | 2, b"12345678"),
            ev.DeviceFeatureReply(1, c.DEVICE_FEATURE_GET | 2, b"12345678"),
            id="feature",
        ),
        pytest.param(
            ev.MigDataRead(1, 16, argsz=24),
            ev.MigDataReadReply(1, b"0123456789abcdef"),
            ev.MigDataReadReply(1, b"0123456789abcdef"),
            id="mig-read",
        ),
        pytest.param(
            ev.MigDataRead(1, 16, argsz=24),
            ev.MigDataReadReply(1, b""),
            ev.MigDataReadReply(1, b""),
            id="mig-read-empty",
        ),
        pytest.param(
            ev.MigDataWrite(1, b"xyz"),
            ev.MigDataWriteReply(1, 3),
            ev.MigDataWriteReply(1, 3),
            id="mig-write",
        ),
        pytest.param(
            ev.RegionRead(1, 0x1000, 0, 4),
            ev.ErrorReply(1, Command.REGION_READ, errno.EIO),
            ev.ErrorReply(1, Command.REGION_READ, errno.EIO),
            id="error",
        ),
        pytest.param(
            ev.DeviceGetRegionIoFds(1, 0),
            ev.ErrorReply(1, Command.DEVICE_GET_REGION_IO_FDS, errno.ENOTSUP),
            ev.ErrorReply(1, Command.DEVICE_GET_REGION_IO_FDS, errno.ENOTSUP),
            id="error-io-fds",
        ),
    ],
)
def test_reply_round_trip(request_: Any, reply: Any, expected: Any, bag: FdBag) -> None:
    _reply_round_trip(request_, reply, expected, bag)


def test_error_reply_is_header_only() -> None:
    client, server = negotiated_pair()
    _exchange(client, server, ev.RegionRead(9, 0, 0, 4), FdBag())
    out = server.send(ev.ErrorReply(9, Command.REGION_READ, errno.EFAULT))
    assert out.data == struct.pack("<HHIII", 9, 9, 16, c.TYPE_REPLY | c.FLAG_ERROR, errno.EFAULT)


def test_region_info_sparse_and_raw_caps_with_fd(bag: FdBag) -> None:
    memfd = bag.memfd(0x8000)
    reply = ev.RegionInfo(1, 2, BAR_FLAGS, 0x8000, 0, (SPARSE, TYPE_CAP), memfd, argsz=256)
    got = _reply_round_trip(
        ev.DeviceGetRegionInfo(1, 2, argsz=256),
        reply,
        lambda fds: dataclasses.replace(
            reply, flags=BAR_FLAGS | c.REGION_INFO_FLAG_CAPS, fd=fds[0], argsz=CHAIN_ARGSZ
        ),
        bag,
    )
    assert got.fd != memfd and fd_is_open(got.fd)


def test_region_info_exact_argsz_carries_caps(bag: FdBag) -> None:
    reply = ev.RegionInfo(1, 2, BAR_FLAGS, 0x8000, 0, (SPARSE, TYPE_CAP), argsz=CHAIN_ARGSZ)
    expected = dataclasses.replace(reply, flags=BAR_FLAGS | c.REGION_INFO_FLAG_CAPS)
    _reply_round_trip(ev.DeviceGetRegionInfo(1, 2, argsz=CHAIN_ARGSZ), reply, expected, bag)


def test_region_info_raw_cap_only(bag: FdBag) -> None:
    cap = ev.RawRegionCap(0x7777, 3, b"opaque body!")
    reply = ev.RegionInfo(1, 8, 3, 0x100, 0x5000, (cap,), argsz=100)
    expected = dataclasses.replace(reply, flags=3 | c.REGION_INFO_FLAG_CAPS, argsz=32 + 8 + 12)
    _reply_round_trip(ev.DeviceGetRegionInfo(1, 8, argsz=100), reply, expected, bag)


@pytest.mark.parametrize("asked", [32, CHAIN_ARGSZ - 1])
def test_region_info_short_argsz(asked: int, bag: FdBag) -> None:
    """Too small an argsz: the needed argsz, no CAPS flag, cap_offset 0, no chain bytes."""
    client, server = negotiated_pair()
    _exchange(client, server, ev.DeviceGetRegionInfo(4, 2, argsz=asked), bag)
    # The device says CAPS itself; the encoder must still drop it in the short reply.
    flags = BAR_FLAGS | c.REGION_INFO_FLAG_CAPS
    out = server.send(ev.RegionInfo(4, 2, flags, 0x8000, 0, (SPARSE, TYPE_CAP), argsz=asked))
    assert len(out.data) == 16 + 32
    argsz, rflags, index, cap_offset, size, offset = struct.unpack_from("<IIIIQQ", out.data, 16)
    assert argsz == CHAIN_ARGSZ
    assert rflags == BAR_FLAGS
    assert not rflags & c.REGION_INFO_FLAG_CAPS
    assert cap_offset == 0
    assert (index, size, offset) == (2, 0x8000, 0)
    client.receive_data(out.data)
    got = one_event(client)
    assert got == ev.RegionInfo(4, 2, BAR_FLAGS, 0x8000, 0, (), None, CHAIN_ARGSZ)
    # QEMU asks again with the argsz it was told.
    _exchange(client, server, ev.DeviceGetRegionInfo(5, 2, argsz=got.argsz), bag)
    full = ev.RegionInfo(5, 2, BAR_FLAGS, 0x8000, 0, (SPARSE, TYPE_CAP), argsz=got.argsz)
    client.receive_data(server.send(full).data)
    again = one_event(client)
    assert again.flags & c.REGION_INFO_FLAG_CAPS
    assert again.caps == (SPARSE, TYPE_CAP)


def test_region_info_chain_layout() -> None:
    """The chain: cap_offset 32, each `next` relative to the start of the info, last 0."""
    client, server = negotiated_pair()
    _exchange(client, server, ev.DeviceGetRegionInfo(1, 2, argsz=512), FdBag())
    out = server.send(ev.RegionInfo(1, 2, BAR_FLAGS, 0x8000, 0, (SPARSE, TYPE_CAP), argsz=512))
    info = out.data[16:]
    assert len(info) == CHAIN_ARGSZ
    assert struct.unpack_from("<I", info, 12) == (32,)
    assert struct.unpack_from("<HHI", info, 32) == (c.REGION_INFO_CAP_SPARSE_MMAP, 1, 80)
    assert struct.unpack_from("<IIQQQQ", info, 40) == (2, 0, 0, 0x1000, 0x3000, 0x2000)
    assert struct.unpack_from("<HHI", info, 80) == (c.REGION_INFO_CAP_TYPE, 1, 0)
    assert info[88:] == TYPE_CAP.body


def test_region_io_fds_reply(bag: FdBag) -> None:
    e1, e2 = bag.eventfd(), bag.eventfd()
    subs = (
        ev.IoFdSubregion(0x0, 4, 0, c.IO_FD_TYPE_IOEVENTFD, 0, 0xDEAD),
        ev.IoFdSubregion(0x8, 8, 1, c.IO_FD_TYPE_IOEVENTFD, 1, 0xBEEF),
    )
    reply = ev.RegionIoFds(1, 0, subs, (e1, e2))
    got = _reply_round_trip(
        ev.DeviceGetRegionIoFds(1, 0, argsz=256),
        reply,
        lambda fds: dataclasses.replace(reply, fds=tuple(fds), argsz=16 + 80),
        bag,
    )
    assert len(got.fds) == 2 and all(fd_is_open(fd) for fd in got.fds)
    assert set(got.fds).isdisjoint({e1, e2})


def test_region_info_error_reply_and_write_multi_error(bag: FdBag) -> None:
    _reply_round_trip(
        ev.DeviceGetRegionInfo(1, 6),
        ev.ErrorReply(1, Command.DEVICE_GET_REGION_INFO, errno.EINVAL),
        ev.ErrorReply(1, Command.DEVICE_GET_REGION_INFO, errno.EINVAL),
        bag,
    )


def test_version_error_reply_lets_the_client_retry() -> None:
    client, server = ClientConnection(), ServerConnection()
    request = _exchange(client, server, ev.VersionRequest(0, 1, 0), FdBag())
    reply = server.version_reply(request)
    assert reply == ev.ErrorReply(0, Command.VERSION, errno.ENOTSUP)
    client.receive_data(server.send(reply).data)
    assert one_event(client) == reply
    assert state(client) is State.AWAIT_VERSION and state(server) is State.AWAIT_VERSION
    request = _exchange(client, server, ev.VersionRequest(1, 0, 0), FdBag())
    client.receive_data(server.send(server.version_reply(request)).data)
    assert isinstance(one_event(client), ev.VersionReply)
    assert state(client) is State.READY and state(server) is State.READY


# ---------------------------------------------------------------- DMA, server to client


def test_dma_read_round_trip() -> None:
    client, server = negotiated_pair()
    request = ev.DmaRead(server.next_msg_id(), 0x100000, 64)
    client.receive_data(server.send(request).data)
    assert one_event(client) == request
    reply = ev.DmaReadReply(request.msg_id, 0x100000, bytes(range(64)))
    server.receive_data(client.send(reply).data)
    assert one_event(server) == reply


def test_dma_write_round_trip() -> None:
    client, server = negotiated_pair()
    request = ev.DmaWrite(server.next_msg_id(), 0x2000, b"hello, guest")
    client.receive_data(server.send(request).data)
    assert one_event(client) == request
    reply = ev.DmaWriteReply(request.msg_id, 0x2000, 12)
    out = client.send(reply)
    assert len(out.data) == 16 + 12, "the specification's reply: u64 address, u32 count"
    server.receive_data(out.data)
    assert one_event(server) == reply


def test_dma_write_reply_in_qemu_layout_is_accepted() -> None:
    """QEMU's own struct has a u64 count: 16 bytes of payload, also taken."""
    client, server = negotiated_pair()
    request = ev.DmaWrite(server.next_msg_id(), 0x2000, b"abcd")
    client.receive_data(server.send(request).data)
    one_event(client)
    payload = struct.pack("<QQ", 0x2000, 4)
    server.receive_data(
        struct.pack("<HHIII", request.msg_id, Command.DMA_WRITE, 32, c.TYPE_REPLY, 0) + payload
    )
    assert one_event(server) == ev.DmaWriteReply(request.msg_id, 0x2000, 4)


def test_dma_error_reply_from_client() -> None:
    client, server = negotiated_pair()
    request = ev.DmaRead(server.next_msg_id(), 0xDEAD000, 8)
    client.receive_data(server.send(request).data)
    one_event(client)
    error = ev.ErrorReply(request.msg_id, Command.DMA_READ, errno.EFAULT)
    server.receive_data(client.send(error).data)
    assert one_event(server) == error


def test_posted_dma_write_gets_no_reply() -> None:
    client, server = negotiated_pair()
    request = ev.DmaWrite(server.next_msg_id(), 0x2000, b"x", no_reply=True)
    client.receive_data(server.send(request).data)
    assert one_event(client) == request
    with pytest.raises(ProtocolError):
        client.send(ev.DmaWriteReply(request.msg_id, 0x2000, 1))


def test_dma_requests_interleave_with_client_requests() -> None:
    """A DMA_READ from the server and the client's next request cross on the wire."""
    client, server = negotiated_pair()
    dma = ev.DmaRead(server.next_msg_id(), 0x1000, 4)
    client.receive_data(server.send(dma).data)
    server.receive_data(client.send(ev.RegionRead(client.next_msg_id(), 0, 0, 4)).data)
    assert one_event(client) == dma
    server.receive_data(client.send(ev.DmaReadReply(dma.msg_id, 0x1000, b"\0\1\2\3")).data)
    events = [server.next_event(), server.next_event(), server.next_event()]
    assert isinstance(events[0], ev.RegionRead)
    assert events[1] == ev.DmaReadReply(dma.msg_id, 0x1000, b"\0\1\2\3")
    assert events[2] is NEED_DATA


def test_dma_request_needs_ready_server() -> None:
    with pytest.raises(ProtocolError):
        ServerConnection().send(ev.DmaRead(0, 0, 4))


def test_server_msg_ids_skip_pending() -> None:
    _, server = negotiated_pair()
    first = server.next_msg_id()
    server.send(ev.DmaRead(first, 0, 4))
    with pytest.raises(ProtocolError):
        server.send(ev.DmaRead(first, 0, 4))
    seen = {server.next_msg_id() for _ in range(1 << 16)}
    assert first not in seen and len(seen) == (1 << 16) - 1


# ---------------------------------------------------------------- ids, pipelining, closing


def test_pipelined_requests_are_answered_in_order() -> None:
    client, server = negotiated_pair()
    data = b"".join(
        client.send(ev.RegionRead(client.next_msg_id(), 4 * k, 0, 4)).data for k in range(20)
    )
    server.receive_data(data)
    replies = b""
    while (request := server.next_event()) is not NEED_DATA:
        assert isinstance(request, ev.RegionRead)
        reply = ev.RegionReadReply(
            request.msg_id, request.offset, 0, struct.pack("<I", request.offset)
        )
        replies += server.send(reply).data
    client.receive_data(replies)
    offsets = []
    while (got := client.next_event()) is not NEED_DATA:
        assert isinstance(got, ev.RegionReadReply)
        offsets.append(struct.unpack("<I", got.data)[0])
    assert offsets == [4 * k for k in range(20)]


def test_client_msg_ids_wrap_and_skip_pending() -> None:
    client, _ = negotiated_pair()
    ids = [client.next_msg_id() for _ in range(70000)]
    # Id 0 went to VERSION; nothing is pending, so the counter simply wraps.
    assert ids == [(k + 1) & 0xFFFF for k in range(70000)]
    pending = client.next_msg_id()
    client.send(ev.RegionRead(pending, 0, 0, 4))
    with pytest.raises(ProtocolError):
        client.send(ev.RegionRead(pending, 0, 0, 4))
    assert pending not in {client.next_msg_id() for _ in range(0xFFFF)}


def test_clean_close_after_complete_messages() -> None:
    client, server = negotiated_pair()
    server.receive_data(client.send(ev.RegionRead(1, 0, 0, 4)).data)
    server.receive_data(b"")
    assert isinstance(server.next_event(), ev.RegionRead)
    assert server.next_event() is CLOSED
    assert server.next_event() is CLOSED
    assert state(server) is State.CLOSED
    client.receive_data(b"")
    assert client.next_event() is CLOSED


def test_client_refuses_to_send_out_of_state() -> None:
    client = ClientConnection()
    with pytest.raises(ProtocolError):
        client.send(ev.RegionRead(0, 0, 0, 4))
    client.send(ev.VersionRequest(0, 0, 0))
    with pytest.raises(ProtocolError):
        client.send(ev.VersionRequest(1, 0, 0))
    with pytest.raises(ProtocolError):
        client.send(ev.DeviceReset(2))


def test_server_refuses_unknown_events() -> None:
    _, server = negotiated_pair()
    with pytest.raises(ProtocolError):
        server.send(object())  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        server.send(ev.RegionRead(0, 0, 0, 4))
