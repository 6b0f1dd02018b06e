"""Guest accesses through the simulated hypervisor to the real device: config cycles, BAR0
and BAR2 of every size, rep accesses through guest buffers both ways, posted writes, and
what a malformed or misrouted request gets."""

from __future__ import annotations

import pytest

from devmodel.testing import REMOTE_PORT_BASE
from devmodel_wire.xen import IOREQ_READ, IOREQ_WRITE, IoReq, IoreqState, IoreqType, encode_ioreq
from tests.xen.rig import APERTURE, BAR0, BAR2, DEVICE, VENDOR, builtin_rig

ONES8 = (1 << 64) - 1


async def test_enumeration_through_config_cycles() -> None:
    async with builtin_rig(enable=False) as rig:
        cpu = rig.cpu
        assert await cpu.config_read(0, 2) == VENDOR
        assert await cpu.config_read(2, 2) == DEVICE
        assert await cpu.config_read(0, 4) == VENDOR | DEVICE << 16
        # BAR sizing as firmware does it: all-ones, read back the mask.
        await cpu.config_write(0x10, 4, 0xFFFFFFFF)
        await cpu.config_write(0x14, 4, 0xFFFFFFFF)
        low = await cpu.config_read(0x10, 4)
        high = await cpu.config_read(0x14, 4)
        assert low & 0xF == 0xC  # 64-bit prefetchable memory
        mask = (high << 32) | (low & ~0xF)
        assert (~mask + 1) & ONES8 == APERTURE
        await cpu.config_write(0x18, 4, 0xFFFFFFFF)
        assert (~(await cpu.config_read(0x18, 4) & ~0xF) + 1) & 0xFFFFFFFF == 4096
        assert rig.sim.server().mmio == []  # sizing never claimed anything
        await rig.enable()
        assert sorted(rig.sim.server().mmio) == [(BAR0, BAR0 + APERTURE - 1), (BAR2, BAR2 + 4095)]
        # Beyond the conventional 256 bytes: all-ones; the device counts it.
        assert await cpu.config_read(0x100, 4) == 0xFFFFFFFF
        assert rig.counters.bad_accesses == 1


async def test_config_cycles_for_another_function_are_not_ours() -> None:
    """Xen routes only the claimed function; anything else reaching us gets all-ones."""
    async with builtin_rig() as rig:
        cpu = rig.cpu
        assert await cpu.config_read(0, 4, sbdf=(0, 0, 3, 0)) == 0xFFFFFFFF
        assert ("config-read", 0) in rig.sim.default_accesses
        rig.sim.server().pcidevs.add((0, 0, 3, 0))  # a confused Xen sends it anyway
        assert await cpu.config_read(0, 4, sbdf=(0, 0, 3, 0)) == 0xFFFFFFFF
        await cpu.config_write(4, 2, 0, sbdf=(0, 0, 3, 0))
        assert rig.counters.bad_accesses == 2
        assert rig.device.config.memory_enabled


@pytest.mark.parametrize("size", [1, 2, 4, 8])
async def test_bar0_every_size(size: int) -> None:
    async with builtin_rig() as rig:
        cpu = rig.cpu
        for i, offset in enumerate((0, size, 0x1000, APERTURE - size)):
            value = (0x0102030405060708 * (i + 1)) & ((1 << (8 * size)) - 1)
            await cpu.write(BAR0 + offset, size, value)
            assert await cpu.read(BAR0 + offset, size) == value
        assert rig.counters.trapped_reads == 4
        assert rig.counters.trapped_writes == 4


async def test_bar0_bytes_land_where_the_guest_put_them() -> None:
    async with builtin_rig() as rig:
        cpu = rig.cpu
        await cpu.write(BAR0 + 0x20, 8, 0x8877665544332211)
        assert await cpu.read(BAR0 + 0x20, 1) == 0x11
        assert await cpu.read(BAR0 + 0x26, 2) == 0x8877
        assert await cpu.read(BAR0 + 0x24, 4) == 0x88776655


async def test_misaligned_bar_access_is_refused_with_all_ones() -> None:
    async with builtin_rig() as rig:
        cpu = rig.cpu
        await cpu.write(BAR0, 8, 0)
        assert await cpu.read(BAR0 + 1, 4) == 0xFFFFFFFF
        await cpu.write(BAR0 + 3, 2, 0xABCD)
        assert await cpu.read(BAR0, 8) == 0
        assert rig.counters.bad_accesses == 2


async def test_register_bar() -> None:
    async with builtin_rig() as rig:
        cpu = rig.cpu
        assert await cpu.read(BAR2, 4) == int.from_bytes(b"DMDL", "little")
        assert await cpu.read(BAR2 + 8, 8) == APERTURE
        await cpu.write(BAR2 + 0x18, 4, 0xCAFEF00D)
        assert await cpu.read(BAR2 + 0x18, 4) == 0xCAFEF00D


def _ram(rig_sim_ram: bytearray, at: int, data: bytes) -> None:
    rig_sim_ram[at : at + len(data)] = data


@pytest.mark.parametrize("df", [False, True])
@pytest.mark.parametrize("size", [1, 4, 8])
async def test_rep_movs_through_a_guest_buffer_both_ways(df: bool, size: int) -> None:
    async with builtin_rig() as rig:
        cpu, ram = rig.cpu, rig.sim.ram
        count = 64
        data = bytes((i * 37 + 5) & 0xFF for i in range(count * size))
        buf = 0x3000
        # With df the first element is the highest: the span is [addr - (count-1)*size, ...].
        span = (count - 1) * size
        first_buf = buf + span if df else buf
        first_bar = BAR0 + 0x800 + (span if df else 0)
        _ram(ram, buf, data)
        done = await cpu.rep(first_bar, size, count, read=False, buffer=first_buf, df=df)
        assert done.state == IoreqState.RESP_READY
        assert await cpu.read_bytes(BAR0 + 0x800, count * size, 1) == data
        # And back into another buffer.
        out = 0x9000
        first_out = out + span if df else out
        await cpu.rep(first_bar, size, count, read=True, buffer=first_out, df=df)
        assert bytes(ram[out : out + count * size]) == data
        assert rig.sim.mappings_open == 0
        assert rig.counters.bad_accesses == 0


async def test_rep_movs_across_a_page_boundary_of_the_buffer() -> None:
    async with builtin_rig() as rig:
        cpu, ram = rig.cpu, rig.sim.ram
        _ram(ram, 0x4FF8, bytes(range(16)))
        await cpu.rep(BAR0, 8, 2, read=False, buffer=0x4FF8)
        assert rig.sim.mapped_frames[-1] == [4, 5]
        assert await cpu.read_bytes(BAR0, 16, 8) == bytes(range(16))


async def test_rep_buffer_inside_lent_memory_is_refused() -> None:
    """data_is_ptr into BAR0 (lent memory): nothing is read or written, it is counted."""
    async with builtin_rig() as rig:
        cpu = rig.cpu
        await cpu.write(BAR0 + 0x100, 8, 0x5555)
        await cpu.rep(BAR0, 8, 4, read=True, buffer=BAR0 + 0x100)
        await cpu.rep(BAR0 + 0x200, 8, 4, read=False, buffer=BAR0 + 0xFF8, df=True)
        # A buffer that only ends inside BAR2 is refused too.
        await cpu.rep(BAR0, 4, 4, read=True, buffer=BAR2 - 8)
        assert rig.counters.bad_accesses == 3
        assert rig.sim.mapped_frames == []
        assert await cpu.read(BAR0 + 0x100, 8) == 0x5555
        assert await cpu.read(BAR0 + 0x200, 8) == 0


async def test_rep_buffer_outside_guest_ram_is_refused() -> None:
    async with builtin_rig() as rig:
        await rig.cpu.rep(BAR0, 8, 2, read=True, buffer=0x4000_0000)
        assert rig.counters.bad_accesses == 1
        assert rig.sim.mappings_open == 0


async def test_rep_without_a_buffer_repeats_the_value() -> None:
    async with builtin_rig() as rig:
        cpu = rig.cpu
        await cpu.rep(BAR0 + 0x40, 4, 8, read=False, value=0xA5A5A5A5)
        assert await cpu.read_bytes(BAR0 + 0x40, 32, 4) == b"\xa5" * 32
        await cpu.rep(BAR0 + 0x7C, 4, 8, read=False, value=0x01020304, df=True)
        assert await cpu.read_bytes(BAR0 + 0x60, 32, 4) == (0x01020304).to_bytes(4, "little") * 8
        await cpu.write(BAR0 + 0x1C, 4, 0x77)
        done = await cpu.rep(BAR0, 4, 8, read=True)
        assert done.data == 0x77  # every element read, the last one returned
        assert rig.counters.trapped_reads == 8 + 2 * 8


async def test_rep_elements_outside_the_bar_are_dropped() -> None:
    async with builtin_rig() as rig:
        cpu = rig.cpu
        # The rep runs off the end of BAR0: Xen routes by the first address.
        await cpu.rep(BAR0 + APERTURE - 8, 8, 3, read=False, value=0x42)
        assert await cpu.read(BAR0 + APERTURE - 8, 8) == 0x42
        assert rig.counters.bad_accesses == 2


async def test_oversized_rep_is_malformed() -> None:
    async with builtin_rig() as rig:
        done = await rig.cpu.rep(BAR0, 8, 1 << 20, read=True)
        assert done.data == ONES8
        await rig.cpu.rep(BAR0, 8, 1 << 20, read=False, buffer=0x1000)
        assert rig.counters.protocol_errors == 2
        assert rig.sim.mapped_frames == []


async def test_rep_through_a_pointer_with_odd_elements_is_refused() -> None:
    async with builtin_rig() as rig:
        await rig.cpu.rep(BAR0, 16, 2, read=True, buffer=0x1000)
        assert rig.counters.bad_accesses == 1
        assert rig.sim.mapped_frames == []


def _raw(kind: int, addr: int, size: int, direction: int, count: int = 1) -> IoReq:
    return IoReq(addr, 0, count, size, 0, IoreqState.READY, False, direction, False, kind)


@pytest.mark.parametrize(
    "req",
    [
        _raw(IoreqType.COPY, BAR0, 3, IOREQ_READ),
        _raw(IoreqType.COPY, BAR0, 16, IOREQ_READ),
        _raw(IoreqType.COPY, BAR0, 0, IOREQ_READ),
        _raw(IoreqType.COPY, BAR0, 4, IOREQ_READ, count=0),
        _raw(5, BAR0, 4, IOREQ_READ),
        _raw(IoreqType.PCI_CONFIG, 0x1E << 35, 8, IOREQ_READ),
        _raw(IoreqType.PCI_CONFIG, 0x1E << 35, 4, IOREQ_READ, count=2),
        _raw(IoreqType.PCI_CONFIG, (0x1E << 35) | 0x1000, 4, IOREQ_READ),
    ],
    ids=["size3", "size16", "size0", "count0", "type5", "cfg8", "cfg-rep", "cfg-offset"],
)
async def test_malformed_requests_are_answered_and_counted(req: IoReq) -> None:
    async with builtin_rig() as rig:
        done = await rig.sim.cpus[1].send(req)
        assert done.state == IoreqState.RESP_READY
        if 0 < req.size <= 8:
            assert done.data == (1 << (8 * req.size)) - 1
        else:
            assert done.data == ONES8
        assert rig.counters.protocol_errors == 1
        # The server goes on serving that vCPU and the others.
        assert await rig.sim.cpus[1].read(BAR2, 4) == int.from_bytes(b"DMDL", "little")
        assert await rig.cpu.read(BAR2, 4) == int.from_bytes(b"DMDL", "little")


async def test_garbage_slot_bytes_are_answered() -> None:
    async with builtin_rig() as rig:
        garbage = bytes(range(30)) + bytes([IoreqState.READY | 0xE0, 0xEE])
        done = await rig.cpu.send(_raw(0, 0, 1, 0), raw=garbage)
        assert done.state == IoreqState.RESP_READY
        assert rig.counters.protocol_errors == 1


async def test_write_to_an_unclaimed_address_is_dropped() -> None:
    """A request Xen should not have sent us (an address in no BAR) is dropped, counted."""
    async with builtin_rig() as rig:
        rig.sim.server().mmio.append((0x1000_0000, 0x1000_0FFF))
        await rig.cpu.write(0x1000_0000, 4, 1)
        assert await rig.cpu.read(0x1000_0000, 4) == 0xFFFFFFFF
        assert rig.counters.bad_accesses == 2


async def test_port_io_is_not_ours() -> None:
    async with builtin_rig() as rig:
        done = await rig.cpu.send(_raw(IoreqType.PIO, 0xCF8, 4, IOREQ_READ))
        assert done.data == 0xFFFFFFFF
        await rig.cpu.send(_raw(IoreqType.PIO, 0x80, 1, IOREQ_WRITE))
        assert rig.counters.bad_accesses == 2


async def test_invalidate_and_timeoffset_are_answered() -> None:
    async with builtin_rig() as rig:
        for kind in (IoreqType.INVALIDATE, IoreqType.TIMEOFFSET):
            done = await rig.cpu.send(IoReq(0, 0, 0, 0, 0, 1, False, 0, False, kind))
            assert done.state == IoreqState.RESP_READY
        assert rig.counters.protocol_errors == 0
        assert rig.counters.bad_accesses == 0


async def test_slot_layout_is_what_xen_sees() -> None:
    """The answer sits in the slot exactly where ioreq.h puts `data` and `state`."""
    async with builtin_rig() as rig:
        await rig.cpu.write(BAR0, 8, 0x0123456789ABCDEF)
        await rig.cpu.read(BAR0, 8)
        raw = bytes(rig.sim.server().ioreq[0:32])
        assert raw[8:16] == (0x0123456789ABCDEF).to_bytes(8, "little")
        assert raw[30] & 0x0F == IoreqState.NONE  # Xen took the answer
        assert int.from_bytes(raw[24:28], "little") == REMOTE_PORT_BASE
        assert (
            raw[:8]
            == encode_ioreq(IoReq(BAR0, 0, 1, 8, 0, 0, False, IOREQ_READ, False, IoreqType.COPY))[
                :8
            ]
        )


async def test_posted_writes_are_performed_in_order() -> None:
    """Xen's ring carries 20-bit addresses: only a BAR below 1 MiB can be reached by one."""
    async with builtin_rig() as rig:
        cpu, sim = rig.cpu, rig.sim
        await rig.enable(bar0=0)  # BAR0 at [0, 1 MiB): the only place posted writes reach
        for i in range(100):
            assert sim.post(0x100 + 8 * (i % 4), 8, i)
        assert sim.post(0x200, 4, 0xDEADBEEF)
        assert sim.post(0x204, 2, 0xBEEF)
        assert sim.post(0x206, 1, 0x7F)
        sim.post(0, 1, 0, type=IoreqType.TIMEOFFSET)
        # The next synchronous access sees every write queued before it.
        assert await cpu.read(0x100, 8) == 96
        assert await cpu.read(0x118, 8) == 99
        assert await cpu.read(0x200, 8) == 0x7FBEEFDEADBEEF
        rd, wr = sim.ring_pointers()
        assert rd == wr == 100 * 2 + 3 + 1
        assert rig.counters.trapped_writes == 103
        assert rig.server.ring.consumed == 204


async def test_a_corrupt_ring_is_skipped_and_the_ring_keeps_working() -> None:
    async with builtin_rig() as rig:
        cpu, sim = rig.cpu, rig.sim
        await rig.enable(bar0=0)
        sim.ring_raw(b"\x01\x02\x00\x00" + bytes(4), 1)  # a read in the ring: nobody answers
        assert await cpu.read(0, 8) == 0
        assert rig.counters.protocol_errors == 1
        sim.ring_raw(b"", 1000)  # write_pointer far beyond the ring
        assert await cpu.read(0, 8) == 0
        assert rig.counters.protocol_errors == 2
        rd, wr = sim.ring_pointers()
        assert rd == wr
        assert sim.post(8, 8, 0x1234)
        assert await cpu.read(8, 8) == 0x1234
