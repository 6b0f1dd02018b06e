"""A whole QEMU-like attach, in memory: ClientConnection <-> ServerConnection <-> a tiny device.

The sequence follows what QEMU's vfio-user-pci client was seen doing (shared reference, "What
QEMU's client does"): VERSION, two DMA_MAPs (one with a memfd), DEVICE_GET_INFO, region info
for BARs 0-5 and config space (with the short-argsz retry), IRQ info for index 3, config reads,
ROM sizing, command register, INTx eventfd, posted BAR writes and WRITE_MULTI batches, reset,
DMA churn, and the close. No trio, no sockets: bytes and fds are handed across by hand.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from devmodel.testing import QEMU_CAPS, QEMU_KEYS, FdBag, drain, state
from pyvfio_user import constants as c
from pyvfio_user import events as ev
from pyvfio_user.connection import ClientConnection, ServerConnection, State
from pyvfio_user.constants import Command, PciIrq, PciRegion
from pyvfio_user.sansio import CLOSED, NEED_DATA
from pyvfio_user.version import QEMU_MAX_DATA_XFER_SIZE, QEMU_MAX_MSG_FDS

BAR0_SIZE = 0x1000
BAR2_SIZE = 0x8000
VENDOR, DEVICE = 0x1AF4, 0x10F0
SPARSE = ev.SparseMmapCap(((0, 0x1000), (0x4000, 0x4000)))
RW = c.REGION_INFO_FLAG_READ | c.REGION_INFO_FLAG_WRITE


class FakeDevice:
    """Just enough of a PCI function to answer QEMU's attach."""

    def __init__(self, bag: FdBag) -> None:
        self.bag = bag
        self.config = bytearray(256)
        self.bar0 = bytearray(BAR0_SIZE)
        self.bar2_fd = bag.memfd(BAR2_SIZE)
        self.maps: dict[int, tuple[int, int | None]] = {}  # address -> (size, fd)
        self.intx: int | None = None
        self.resets = 0
        self._power_on()

    def _power_on(self) -> None:
        self.config[:] = bytes(256)
        struct.pack_into("<HH", self.config, 0, VENDOR, DEVICE)
        self.config[0x0B] = 0x05  # class: memory controller
        self.config[0x3D] = 1  # interrupt pin INTA#
        self.bar0[:] = bytes(BAR0_SIZE)

    def _region_info(self, e: ev.DeviceGetRegionInfo) -> ev.RegionInfo | ev.ErrorReply:
        if e.index == PciRegion.BAR0:
            return ev.RegionInfo(e.msg_id, 0, RW, BAR0_SIZE, argsz=e.argsz)
        if e.index == PciRegion.BAR2:
            flags = RW | c.REGION_INFO_FLAG_MMAP
            return ev.RegionInfo(
                e.msg_id, 2, flags, BAR2_SIZE, 0, (SPARSE,), self.bar2_fd, argsz=e.argsz
            )
        if e.index == PciRegion.CONFIG:
            return ev.RegionInfo(e.msg_id, 7, RW, 256, argsz=e.argsz)
        if e.index < c.PCI_NUM_REGIONS:
            return ev.RegionInfo(e.msg_id, e.index, 0, 0, argsz=e.argsz)
        return ev.ErrorReply(e.msg_id, Command.DEVICE_GET_REGION_INFO, errno.EINVAL)

    def _memory(self, region: int) -> bytearray | None:
        if region == PciRegion.BAR0:
            return self.bar0
        return self.config if region == PciRegion.CONFIG else None

    def _write(self, region: int, offset: int, data: bytes) -> bool:
        memory = self._memory(region)
        if memory is None or offset + len(data) > len(memory):
            return False
        if region == PciRegion.CONFIG:
            if offset == 0x30 or offset < 4:  # no ROM; IDs are read-only
                return True
            if offset == 0x10 and len(data) == 4:  # BAR0 sizing
                value = int.from_bytes(data, "little") & ~(BAR0_SIZE - 1) & 0xFFFF_FFFF
                data = value.to_bytes(4, "little")
        memory[offset : offset + len(data)] = data
        return True

    def handle(self, e: Any) -> Any:
        if isinstance(e, ev.DmaMap):
            self.maps[e.address] = (e.size, e.fd)
            return ev.Ack(e.msg_id, Command.DMA_MAP)
        if isinstance(e, ev.DmaUnmap):
            doomed = list(self.maps) if e.flags & c.DMA_UNMAP_ALL else [e.address]
            for address in doomed:
                _size, fd = self.maps.pop(address)
                if fd is not None:
                    os.close(fd)
            return ev.DmaUnmapReply(e.msg_id, e.flags, e.address, e.size, e.argsz)
        if isinstance(e, ev.DeviceGetInfo):
            flags = c.DEVICE_FLAGS_PCI | c.DEVICE_FLAGS_RESET
            return ev.DeviceInfo(e.msg_id, flags, c.PCI_NUM_REGIONS, c.PCI_NUM_IRQS)
        if isinstance(e, ev.DeviceGetRegionInfo):
            return self._region_info(e)
        if isinstance(e, ev.DeviceGetIrqInfo):
            count = 1 if e.index == PciIrq.INTX else 0
            return ev.IrqInfo(e.msg_id, e.index, c.IRQ_INFO_EVENTFD, count)
        if isinstance(e, ev.DeviceSetIrqs):
            assert e.index == PciIrq.INTX
            if self.intx is not None:
                os.close(self.intx)
            self.intx = e.fds[0] if e.fds else None
            return ev.Ack(e.msg_id, Command.DEVICE_SET_IRQS)
        if isinstance(e, ev.RegionRead):
            memory = self._memory(e.region)
            if memory is None or e.offset + e.count > len(memory):
                return ev.ErrorReply(e.msg_id, Command.REGION_READ, errno.EINVAL)
            data = bytes(memory[e.offset : e.offset + e.count])
            return ev.RegionReadReply(e.msg_id, e.offset, e.region, data)
        if isinstance(e, ev.RegionWrite):
            ok = self._write(e.region, e.offset, e.data)
            if e.no_reply:
                return None
            if not ok:
                return ev.ErrorReply(e.msg_id, Command.REGION_WRITE, errno.EINVAL)
            return ev.RegionWriteReply(e.msg_id, e.offset, e.region, len(e.data))
        if isinstance(e, ev.RegionWriteMulti):
            for w in e.writes:
                self._write(w.region, w.offset, w.data)
            return None if e.no_reply else ev.RegionWriteMultiReply(e.msg_id, len(e.writes))
        if isinstance(e, ev.DeviceReset):
            self.resets += 1
            self._power_on()
            return ev.Ack(e.msg_id, Command.DEVICE_RESET)
        if isinstance(e, ev.BadRequest):
            return None if e.no_reply else ev.ErrorReply(e.msg_id, e.command, e.errno)
        raise AssertionError(f"unexpected request {e}")

    def close(self) -> None:
        for _size, fd in self.maps.values():
            if fd is not None:
                os.close(fd)
        self.maps.clear()
        if self.intx is not None:
            os.close(self.intx)
            self.intx = None


class Link:
    """The two connections and the device, with fds duplicated as SCM_RIGHTS would."""

    def __init__(self, bag: FdBag) -> None:
        self.bag = bag
        self.client = ClientConnection(QEMU_CAPS)
        self.server = ServerConnection()
        self.device = FakeDevice(bag)
        self.served = 0

    def _to_server(self, event: Any) -> None:
        out = self.client.send(event)
        fds = [os.dup(fd) for fd in out.fds]  # the device owns these once they arrive
        self.server.receive_data(out.data, fds)

    def _serve(self) -> None:
        for request in drain(self.server):
            self.served += 1
            if isinstance(request, ev.VersionRequest):
                reply: Any = self.server.version_reply(request)
            else:
                reply = self.device.handle(request)
            if reply is not None:
                out = self.server.send(reply)
                self.client.receive_data(out.data, self.bag.travel(out.fds))

    def pipeline(self, *events: Any) -> list[Any]:
        """Send all, serve in order, return the client's replies in order."""
        for event in events:
            self._to_server(event)
        self._serve()
        return drain(self.client)

    def ask(self, event: Any) -> Any:
        replies = self.pipeline(event)
        assert len(replies) == 1, replies
        return replies[0]

    def post(self, event: Any) -> None:
        assert event.no_reply
        assert self.pipeline(event) == []

    def next_id(self) -> int:
        return self.client.next_msg_id()

    def read(self, region: int, offset: int, count: int) -> bytes:
        reply = self.ask(ev.RegionRead(self.next_id(), offset, region, count))
        assert isinstance(reply, ev.RegionReadReply), reply
        assert (reply.offset, reply.region, len(reply.data)) == (offset, region, count)
        return reply.data

    def config_write(self, offset: int, data: bytes) -> None:
        msg_id = self.next_id()
        reply = self.ask(ev.RegionWrite(msg_id, offset, PciRegion.CONFIG, data))
        assert reply == ev.RegionWriteReply(msg_id, offset, PciRegion.CONFIG, len(data))


@pytest.fixture
def link() -> Iterator[Link]:
    bag = FdBag()
    link = Link(bag)
    yield link
    link.device.close()
    bag.close_all()


def test_qemu_like_attach(link: Link) -> None:
    bag = link.bag
    # ---- VERSION
    reply = link.ask(ev.VersionRequest(link.next_id(), 0, 0, QEMU_CAPS))
    assert isinstance(reply, ev.VersionReply)
    assert (reply.major, reply.minor) == (0, 0)
    assert reply.keys is not None and reply.keys <= QEMU_KEYS
    caps = reply.capabilities
    assert caps.max_msg_fds <= QEMU_MAX_MSG_FDS
    assert caps.max_data_xfer_size <= QEMU_MAX_DATA_XFER_SIZE
    assert caps.pgsizes % 4096 == 0 and caps.max_dma_maps <= 65535
    assert caps.write_multiple
    assert state(link.client) is State.READY and state(link.server) is State.READY

    # ---- DMA_MAP x2: guest RAM with a memfd, the BIOS area without one
    ram = bag.memfd(1 << 20)
    ram_map = ev.DmaMap(link.next_id(), 3, 0, 0x0, 1 << 20, ram)
    bios_map = ev.DmaMap(link.next_id(), c.DMA_READ_FLAG, 0, 0xFFFC0000, 0x40000)
    assert link.pipeline(ram_map, bios_map) == [
        ev.Ack(ram_map.msg_id, Command.DMA_MAP),
        ev.Ack(bios_map.msg_id, Command.DMA_MAP),
    ]
    size, device_fd = link.device.maps[0]
    assert size == 1 << 20 and device_fd is not None and device_fd != ram
    os.pwrite(device_fd, b"from the device", 0x1000)  # the device's fd is the guest's RAM
    assert os.pread(ram, 15, 0x1000) == b"from the device"
    assert link.device.maps[0xFFFC0000] == (0x40000, None)

    # ---- DEVICE_GET_INFO
    info = link.ask(ev.DeviceGetInfo(link.next_id()))
    assert isinstance(info, ev.DeviceInfo)
    assert info.flags == c.DEVICE_FLAGS_PCI | c.DEVICE_FLAGS_RESET
    assert (info.num_regions, info.num_irqs) == (9, 5)

    # ---- GET_REGION_INFO for 0-5 and 7, argsz 32; BAR2 needs a second ask for its caps
    regions: dict[int, ev.RegionInfo] = {}
    for index in (0, 1, 2, 3, 4, 5, 7):
        got = link.ask(ev.DeviceGetRegionInfo(link.next_id(), index))
        assert isinstance(got, ev.RegionInfo) and got.index == index
        if got.argsz > 32:
            assert not got.flags & c.REGION_INFO_FLAG_CAPS and not got.caps
            if got.fd is not None:
                os.close(got.fd)  # QEMU drops the fd of the short reply and asks again
            got = link.ask(ev.DeviceGetRegionInfo(link.next_id(), index, argsz=got.argsz))
            assert got.flags & c.REGION_INFO_FLAG_CAPS
        regions[index] = got
    assert regions[0] == ev.RegionInfo(regions[0].msg_id, 0, RW, BAR0_SIZE)
    assert regions[2].caps == (SPARSE,) and regions[2].argsz == 32 + 8 + 8 + 32
    assert regions[2].fd is not None
    assert os.fstat(regions[2].fd).st_size == BAR2_SIZE
    for index in (1, 3, 4, 5):
        assert (regions[index].size, regions[index].flags) == (0, 0)
    assert (regions[7].size, regions[7].flags) == (256, RW)

    # ---- GET_IRQ_INFO: index 3 only
    irq = link.ask(ev.DeviceGetIrqInfo(link.next_id(), PciIrq.ERR))
    assert isinstance(irq, ev.IrqInfo) and (irq.index, irq.count) == (3, 0)

    # ---- config space: 256-byte read, ROM sizing, BAR0 and interrupt pin, command register
    config = link.read(PciRegion.CONFIG, 0, 256)
    assert struct.unpack_from("<HH", config) == (VENDOR, DEVICE)
    link.config_write(0x30, b"\x00\xf8\xff\xff")
    assert link.read(PciRegion.CONFIG, 0x30, 4) == bytes(4)  # no ROM
    assert link.read(PciRegion.CONFIG, 0x10, 4) == bytes(4)  # 32-bit memory BAR, type bits 0
    assert link.read(PciRegion.CONFIG, 0x3D, 1) == b"\x01"
    assert link.read(PciRegion.CONFIG, 0x04, 2) == b"\x00\x00"
    link.config_write(0x04, b"\x06\x00")
    assert link.read(PciRegion.CONFIG, 0x04, 2) == b"\x06\x00"
    link.config_write(0x10, b"\xff\xff\xff\xff")  # guest BAR sizing reaches the server
    assert link.read(PciRegion.CONFIG, 0x10, 4) == struct.pack("<I", 0xFFFFF000)
    link.config_write(0x10, b"\x00\x00\x00\x00")

    # ---- INTx: one SET_IRQS (TRIGGER|EVENTFD) with one eventfd; the device rings it
    intx = bag.eventfd()
    flags = c.IRQ_SET_ACTION_TRIGGER | c.IRQ_SET_DATA_EVENTFD
    set_irqs = ev.DeviceSetIrqs(link.next_id(), flags, PciIrq.INTX, 0, 1, fds=(intx,))
    assert link.ask(set_irqs) == ev.Ack(set_irqs.msg_id, Command.DEVICE_SET_IRQS)
    assert link.device.intx is not None
    os.eventfd_write(link.device.intx, 1)
    assert os.eventfd_read(intx) == 1

    # ---- BAR0: reads of 1, 2, 4, 8 bytes; posted writes get no reply, reads see them
    for count in (1, 2, 4, 8):
        assert link.read(PciRegion.BAR0, 0x100, count) == bytes(count)
    link.post(ev.RegionWrite(link.next_id(), 0x100, 0, b"\x78\x56\x34\x12", no_reply=True))
    assert link.read(PciRegion.BAR0, 0x100, 4) == b"\x78\x56\x34\x12"
    # A posted write and the read right behind it, pipelined: the read sees the write.
    replies = link.pipeline(
        ev.RegionWrite(link.next_id(), 0x108, 0, b"\xef\xbe\xad\xde", no_reply=True),
        ev.RegionRead(read_id := link.next_id(), 0x108, 0, 4),
    )
    assert replies == [ev.RegionReadReply(read_id, 0x108, 0, b"\xef\xbe\xad\xde")]

    # ---- write_multiple: a batch of 200 posted writes in one message
    writes = tuple(ev.WriteEntry(8 * k, 0, struct.pack("<Q", k)) for k in range(200))
    link.post(ev.RegionWriteMulti(link.next_id(), writes, no_reply=True))
    assert link.read(PciRegion.BAR0, 8 * 199, 8) == struct.pack("<Q", 199)
    assert link.read(PciRegion.BAR0, 0x108, 4) == struct.pack("<I", 0x21)

    # ---- an access the device refuses: the guest reads all-ones, both carry on
    bad = link.ask(ev.RegionRead(bad_id := link.next_id(), BAR0_SIZE, 0, 4))
    assert bad == ev.ErrorReply(bad_id, Command.REGION_READ, errno.EINVAL)
    assert link.read(PciRegion.BAR0, 0, 1) == b"\x00"

    # ---- machine reset: DEVICE_RESET, then every BAR register written to 0
    reset = ev.DeviceReset(link.next_id())
    assert link.ask(reset) == ev.Ack(reset.msg_id, Command.DEVICE_RESET)
    assert link.device.resets == 1
    for bar in range(6):
        link.config_write(0x10 + 4 * bar, bytes(4))
    assert link.read(PciRegion.CONFIG, 0x04, 2) == b"\x00\x00"
    assert link.read(PciRegion.BAR0, 0x100, 4) == bytes(4)

    # ---- DMA churn while firmware changes memory, then UNMAP_ALL
    for _ in range(3):
        unmap = ev.DmaUnmap(link.next_id(), 0, 0xFFFC0000, 0x40000)
        assert link.ask(unmap) == ev.DmaUnmapReply(unmap.msg_id, 0, 0xFFFC0000, 0x40000)
        remap = ev.DmaMap(link.next_id(), c.DMA_READ_FLAG, 0, 0xFFFC0000, 0x40000)
        assert link.ask(remap) == ev.Ack(remap.msg_id, Command.DMA_MAP)
    unmap_all = ev.DmaUnmap(link.next_id(), c.DMA_UNMAP_ALL, 0, 0)
    assert link.ask(unmap_all) == ev.DmaUnmapReply(unmap_all.msg_id, c.DMA_UNMAP_ALL, 0, 0)
    assert link.device.maps == {}
    with pytest.raises(OSError):
        os.fstat(device_fd)  # the device dropped its reference to guest RAM

    # ---- QEMU goes away: the server sees the end of the stream
    assert link.client.next_event() is NEED_DATA
    link.server.receive_data(b"")
    assert link.server.next_event() is CLOSED
    assert state(link.server) is State.CLOSED


def test_attach_with_a_wrapping_message_counter(link: Link) -> None:
    """QEMU numbers messages from one global 16-bit counter that wraps (seen)."""
    link.ask(ev.VersionRequest(link.next_id(), 0, 0, QEMU_CAPS))
    total = 0
    for _ in range(70):
        batch = [ev.RegionRead(link.next_id(), 0, PciRegion.CONFIG, 2) for _ in range(1000)]
        replies = link.pipeline(*batch)
        assert [r.msg_id for r in replies] == [e.msg_id for e in batch]
        assert all(r.data == struct.pack("<H", VENDOR) for r in replies)
        total += len(replies)
    assert total == 70000 and link.served == 70001
