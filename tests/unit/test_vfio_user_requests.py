"""vfio-user request handling without a socket: a client connection in memory, the replies read
back from `VfioUserRequests.out`, or a handler called with an event."""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devmodel.backend import DeviceBackend
from devmodel.pci import config_space as cs
from devmodel.pci.function import REGION_CONFIG
from devmodel.testing import drain, memory_backend
from devmodel.transports.vfio_user_requests import VfioUserRequests
from pyvfio_user import constants as c
from pyvfio_user import events as ev
from pyvfio_user.connection import ClientConnection, ServerConnection
from pyvfio_user.constants import Command
from pyvfio_user.errors import ProtocolError
from pyvfio_user.sansio import NEED_DATA

APERTURE = 2 << 20
BAR0_AT = 0xE000_0000


@pytest.fixture
def backend() -> Iterator[DeviceBackend]:
    with memory_backend(APERTURE) as b:
        yield b


class Pair:
    """A client connection and the server-side requests, joined without a socket."""

    def __init__(self, requests: VfioUserRequests) -> None:
        self.requests = requests
        self.client = ClientConnection()

    async def exchange(self, *events: Any) -> list[Any]:
        """Send `events` (msg ids filled in), let the requests be answered, return the replies."""
        for event in events:
            self.requests.conn.receive_data(self.client.send(event).data)
        assert await self.requests.process() is True
        for data, fds in self.requests.out:
            assert not fds
            self.client.receive_data(data)
        self.requests.out.clear()
        return drain(self.client)

    def msg_id(self) -> int:
        return self.client.next_msg_id()


@pytest.fixture
async def pair(backend: DeviceBackend) -> AsyncIterator[Pair]:
    requests = VfioUserRequests(backend)
    p = Pair(requests)
    (reply,) = await p.exchange(ev.VersionRequest(p.msg_id(), 0, 0, p.client.capabilities))
    assert isinstance(reply, ev.VersionReply)
    yield p
    requests.close()


async def test_region_write_then_read_of_bar0(pair: Pair) -> None:
    data = (0x0123456789ABCDEF).to_bytes(8, "little")
    wid, rid = pair.msg_id(), pair.msg_id()
    write, read = await pair.exchange(
        ev.RegionWrite(wid, 0x40, 0, data), ev.RegionRead(rid, 0x40, 0, 8)
    )
    assert write == ev.RegionWriteReply(wid, 0x40, 0, 8)
    assert read == ev.RegionReadReply(rid, 0x40, 0, data)
    assert pair.requests.current is None


async def test_posted_writes_get_no_reply_and_write_multi_counts(pair: Pair) -> None:
    assert await pair.exchange(ev.RegionWrite(pair.msg_id(), 0, 0, b"\x07" * 4, True)) == []
    mid = pair.msg_id()
    writes = (ev.WriteEntry(8, 0, b"\x01" * 8), ev.WriteEntry(3, 0, b"\x01" * 4))
    (reply,) = await pair.exchange(ev.RegionWriteMulti(mid, writes))
    assert reply == ev.RegionWriteMultiReply(mid, 1)  # the misaligned one was refused
    (read,) = await pair.exchange(ev.RegionRead(pair.msg_id(), 0, 0, 4))
    assert read.data == b"\x07" * 4


@pytest.mark.parametrize(
    ("region", "offset", "count", "code", "counted"),
    [
        (0, 2, 4, errno.EINVAL, True),
        (0, APERTURE, 4, errno.EFAULT, True),
        (3, 0, 4, errno.EINVAL, True),
        (7, 256, 4, errno.EFAULT, True),
        (6, 0, 4, errno.EINVAL, False),
        (9, 0, 4, errno.EINVAL, False),
    ],
)
async def test_refused_accesses_answer_their_errno(
    pair: Pair, region: int, offset: int, count: int, code: int, counted: bool
) -> None:
    counters = pair.requests.counters
    rid, wid = pair.msg_id(), pair.msg_id()
    read, write = await pair.exchange(
        ev.RegionRead(rid, offset, region, count),
        ev.RegionWrite(wid, offset, region, bytes(count)),
    )
    assert read == ev.ErrorReply(rid, Command.REGION_READ, code)
    assert write == ev.ErrorReply(wid, Command.REGION_WRITE, code)
    assert counters.bad_accesses == (2 if counted else 0)
    assert counters.protocol_errors == 0


async def test_a_config_write_through_region_7_moves_bar0(pair: Pair) -> None:
    backend = pair.requests.backend
    for offset, value, size in (
        (cs.BAR_BASE, BAR0_AT, 4),
        (cs.BAR_BASE + 4, 0, 4),
        (cs.COMMAND, cs.CMD_MEMORY, 2),
    ):
        data = value.to_bytes(size, "little")
        await pair.exchange(ev.RegionWrite(pair.msg_id(), offset, 7, data))
    assert backend.route(BAR0_AT + 16) is not None
    # A DMA map over the BAR is recorded and flagged, never used.
    fd = os.memfd_create("dma")
    reply = pair.requests.handle(ev.DmaMap(1, 3, 0, BAR0_AT, 4096, fd))
    assert reply == ev.Ack(1, Command.DMA_MAP)
    assert [r.overlaps_bar for r in pair.requests.dma] == [True]
    assert pair.requests.handle(ev.DmaUnmap(2, 0, BAR0_AT, 4096)) == ev.DmaUnmapReply(
        2, 0, BAR0_AT, 4096
    )
    refused = pair.requests.handle(ev.DmaUnmap(3, 0, BAR0_AT, 4096))
    assert isinstance(refused, ev.ErrorReply) and refused.command == Command.DMA_UNMAP


def test_info_requests_without_a_connection(backend: DeviceBackend) -> None:
    requests = VfioUserRequests(backend)
    info = requests.handle(ev.DeviceGetInfo(1))
    assert info == ev.DeviceInfo(
        1, c.DEVICE_FLAGS_RESET | c.DEVICE_FLAGS_PCI, c.PCI_NUM_REGIONS, c.PCI_NUM_IRQS
    )
    rw = c.REGION_INFO_FLAG_READ | c.REGION_INFO_FLAG_WRITE
    assert requests.handle(ev.DeviceGetRegionInfo(2, 0)) == ev.RegionInfo(2, 0, rw, APERTURE, 0)
    assert requests.handle(ev.DeviceGetRegionInfo(3, 7)) == ev.RegionInfo(3, 7, rw, 256, 0)
    assert requests.handle(ev.DeviceGetRegionInfo(4, 8)) == ev.RegionInfo(4, 8, 0, 0, 0)
    assert requests.handle(ev.DeviceGetRegionInfo(5, 9)) == ev.ErrorReply(
        5, Command.DEVICE_GET_REGION_INFO, errno.EINVAL
    )
    assert requests.handle(ev.DeviceGetIrqInfo(6, c.PCI_NUM_IRQS)) == ev.ErrorReply(
        6, Command.DEVICE_GET_IRQ_INFO, errno.EINVAL
    )
    assert isinstance(requests.handle(ev.DeviceGetIrqInfo(7, 0)), ev.IrqInfo)
    assert requests.handle(ev.MigDataRead(8, 16)) == ev.ErrorReply(
        8, Command.MIG_DATA_READ, errno.ENOTSUP
    )
    bad = requests.handle(ev.BadRequest(9, Command.DMA_MAP, errno=errno.EINVAL, reason="junk"))
    assert bad == ev.ErrorReply(9, Command.DMA_MAP, errno.EINVAL)
    assert backend.counters.protocol_errors == 1
    requests.close()


def test_reset_is_acked_and_undecodes(backend: DeviceBackend) -> None:
    backend.config_write(cs.BAR_BASE, BAR0_AT.to_bytes(4, "little"))
    backend.config_write(cs.COMMAND, cs.CMD_MEMORY.to_bytes(2, "little"))
    assert backend.bus.mapped
    requests = VfioUserRequests(backend)
    assert requests.handle(ev.DeviceReset(1)) == ev.Ack(1, Command.DEVICE_RESET)
    assert backend.counters.resets == 1
    assert backend.bus.mapped == ()
    requests.close()


async def test_a_forced_stop_answers_the_access_in_flight_with_eio(pair: Pair) -> None:
    rid = pair.msg_id()
    # The server took the request off its connection and was serving it when stopped.
    pair.requests.conn.receive_data(pair.client.send(ev.RegionRead(rid, 0, 0, 8)).data)
    taken = pair.requests.conn.next_event()
    assert isinstance(taken, ev.RegionRead)
    pair.requests.current = taken
    pair.requests.fail_current()
    assert pair.requests.current is None
    (data, _fds) = pair.requests.out.pop()
    pair.client.receive_data(data)
    assert drain(pair.client) == [ev.ErrorReply(rid, Command.REGION_READ, errno.EIO)]


async def test_process_reports_the_client_closing(pair: Pair) -> None:
    pair.requests.conn.receive_data(b"")
    assert await pair.requests.process() is False


async def test_plain_reads_take_the_shortcut_and_answer_as_send_would(pair: Pair) -> None:
    """A plain REGION_READ of BAR0 skips the event (`next_read`, `read_now`, `read_reply`):
    its reply is byte for byte what `send(RegionReadReply)` makes, and it is counted."""
    (ack,) = await pair.exchange(ev.RegionWrite(pair.msg_id(), 64, 0, b"\x11" * 8))
    assert isinstance(ack, ev.RegionWriteReply)
    counters = pair.requests.counters
    before = counters.trapped_reads
    msg_id = pair.msg_id()
    pair.requests.conn.receive_data(pair.client.send(ev.RegionRead(msg_id, 64, 0, 8)).data)
    conn = pair.requests.conn
    taken = conn.next_read()
    assert taken == (msg_id, 64, 0, 8)
    assert conn.next_read() is NEED_DATA  # nothing left: what next_event says too
    assert conn.next_event() is NEED_DATA
    conn.receive_data(pair.client.send(ev.DeviceGetInfo(pair.msg_id())).data)
    assert conn.next_read() is None  # not a read: next_event's business
    assert isinstance(conn.next_event(), ev.DeviceGetInfo)
    reply = ev.RegionReadReply(msg_id, 64, 0, b"\x11" * 8)
    conn.owe_read(*taken)  # owed now, as if next_event had returned it
    assert conn.send(reply).data == conn.read_reply(msg_id, 64, 0, b"\x11" * 8)
    # Through process: the same reply, the read counted once.
    (got,) = await pair.exchange(ev.RegionRead(pair.msg_id(), 64, 0, 8))
    assert isinstance(got, ev.RegionReadReply) and got.data == b"\x11" * 8
    assert counters.trapped_reads == before + 1


@settings(max_examples=200, deadline=None)
@given(
    msg_id=st.integers(0, 0xFFFF),
    offset=st.integers(0, 2**64 - 1),
    region=st.integers(0, 2**32 - 1),
    data=st.binary(max_size=64),
    owed=st.integers(1, 3),
)
def test_an_owed_read_is_paid_and_encoded_as_send_would(
    msg_id: int, offset: int, region: int, data: bytes, owed: int
) -> None:
    """`read_reply_owed` (the reply to a read that waited): the bytes of
    `send(RegionReadReply)`, the same debt paid, and no reply for a read nobody owes."""
    fast, general = ServerConnection(), ServerConnection()
    for conn in (fast, general):
        for _ in range(owed):
            conn.owe_read(msg_id, offset, region, len(data))
    for _ in range(owed):
        got = fast.read_reply_owed(msg_id, offset, region, data)
        assert got == general.send(ev.RegionReadReply(msg_id, offset, region, data)).data
    for conn in (fast, general):
        with pytest.raises(ProtocolError):
            conn.read_reply_owed(msg_id, offset, region, data)


async def test_reads_the_shortcut_leaves_alone_take_the_general_way(pair: Pair) -> None:
    """Reads that are not plain BAR0 reads of resident memory: other regions, refused shapes."""
    conn = pair.requests.conn
    # Config space (region 7) and BAR2: read through the bus as ever.
    (cfg,) = await pair.exchange(ev.RegionRead(pair.msg_id(), 0, REGION_CONFIG, 4))
    assert isinstance(cfg, ev.RegionReadReply) and len(cfg.data) == 4
    # Unaligned and oversized BAR0 reads: refused with EINVAL, counted as bad accesses.
    bad = pair.requests.counters.bad_accesses
    replies = await pair.exchange(
        ev.RegionRead(pair.msg_id(), 3, 0, 8), ev.RegionRead(pair.msg_id(), 0, 0, 16)
    )
    assert [type(r) for r in replies] == [ev.ErrorReply, ev.ErrorReply]
    assert all(r.errno == errno.EINVAL for r in replies)
    assert pair.requests.counters.bad_accesses == bad + 2
    assert conn.buffered == 0
    conn.receive_data(b"")  # the client closed: next_event's CLOSED, never NEED_DATA
    assert conn.next_read() is None
    assert await pair.requests.process() is False
