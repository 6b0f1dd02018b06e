"""BAR2: the register table, live counters, scratch, the MSI-X table and PBA, access shapes."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import fields

import pytest

from devmodel.aperture import OwnedMemory
from devmodel.counters import DeviceCounters
from devmodel.pci.function import AccessError, PciFunction
from devmodel.pci.identity import PciIdentity
from devmodel.pci.irqs import IrqIndex
from devmodel.pci.registers import (
    COUNTER_REGISTERS,
    INTERFACE_VERSION,
    MSIX_PBA_OFFSET,
    MSIX_TABLE_OFFSET,
    MSIX_VECTORS,
    REGISTER_BAR_SIZE,
    REGISTER_BY_NAME,
    REGISTERS,
    Feature,
    RegAccess,
    render_markdown,
)

MiB = 1 << 20
APERTURE = 256 * MiB


@pytest.fixture
def fn() -> Iterator[PciFunction]:
    f = PciFunction(
        PciIdentity(), OwnedMemory(APERTURE), DeviceCounters(), features=Feature.LENT
    )
    yield f
    f.close()
    f.aperture.close()


async def read(fn: PciFunction, offset: int, size: int) -> int:
    return int.from_bytes(await fn.bar_read(2, offset, size), "little")


async def reg(fn: PciFunction, name: str) -> int:
    r = REGISTER_BY_NAME[name]
    return await read(fn, r.offset, r.width)


# --- the table --------------------------------------------------------------------------------


def test_table_is_well_formed() -> None:
    end = 0
    for r in REGISTERS:
        assert r.offset >= end, f"{r.name} overlaps its predecessor"
        assert r.offset % min(r.width, 8) == 0, f"{r.name} is not naturally aligned"
        assert r.offset + r.width <= REGISTER_BAR_SIZE
        end = r.offset + r.width
    assert len(REGISTER_BY_NAME) == len(REGISTERS)


def test_every_counter_has_a_register() -> None:
    for field in fields(DeviceCounters):
        r = REGISTER_BY_NAME[field.name.upper()]
        assert r.width == 8 and r.access is RegAccess.RO
    assert set(COUNTER_REGISTERS.values()) == {f.name for f in fields(DeviceCounters)}


def test_markdown_documents_every_register() -> None:
    doc = render_markdown()
    for r in REGISTERS:
        assert f"| {r.offset:#05x} | {r.width} | {r.access} | {r.name} |" in doc


# --- identification ------------------------------------------------------------------------


async def test_identification_registers(fn: PciFunction) -> None:
    assert await fn.bar_read(2, 0, 4) == b"DMDL"
    assert await reg(fn, "VERSION") == INTERFACE_VERSION
    assert await reg(fn, "APERTURE_SIZE") == APERTURE
    assert await reg(fn, "GRANULE") == fn.aperture.granule
    assert await reg(fn, "FEATURES") == Feature.MSI | Feature.MSIX | Feature.LENT


async def test_u64_halves_and_small_reads(fn: PciFunction) -> None:
    fn.counters.page_ins = 0x0123_4567_89AB_CDEF
    off = REGISTER_BY_NAME["PAGE_INS"].offset
    assert await read(fn, off, 8) == 0x0123_4567_89AB_CDEF
    assert await read(fn, off, 4) == 0x89AB_CDEF
    assert await read(fn, off + 4, 4) == 0x0123_4567
    assert await read(fn, off + 6, 2) == 0x0123
    assert await read(fn, off + 1, 1) == 0xCD


async def test_small_reads_agree_with_wide_reads(fn: PciFunction) -> None:
    fn.counters.trapped_writes = 0xDEAD_BEEF_0042
    wide = b"".join([await fn.bar_read(2, off, 8) for off in range(0, 0x80, 8)])
    for size in (1, 2, 4):
        narrow = b"".join([await fn.bar_read(2, off, size) for off in range(0, 0x80, size)])
        assert narrow == wide
    # an 8-byte read spanning two 4-byte registers
    assert wide[0:8] == b"DMDL" + INTERFACE_VERSION.to_bytes(4, "little")


async def test_counters_are_live(fn: PciFunction) -> None:
    for name, field in COUNTER_REGISTERS.items():
        setattr(fn.counters, field, 1000 + REGISTER_BY_NAME[name].offset)
    for name in COUNTER_REGISTERS:
        assert await reg(fn, name) == 1000 + REGISTER_BY_NAME[name].offset


async def test_bar0_traffic_shows_in_counters(fn: PciFunction) -> None:
    await fn.bar_write(0, 0, b"\0" * 8)
    await fn.bar_read(0, 0, 4)
    await fn.bar_read(0, 8, 8)
    with pytest.raises(AccessError):
        await fn.bar_read(0, 3, 4)
    assert await reg(fn, "TRAPPED_READS") == 2
    assert await reg(fn, "TRAPPED_WRITES") == 1
    assert await reg(fn, "BAD_ACCESSES") == 1
    # Register reads themselves are not trapped aperture reads.
    assert fn.counters.trapped_reads == 2


async def test_counters_wrap_to_64_bits(fn: PciFunction) -> None:
    fn.counters.failed_accesses = (1 << 64) + 5
    assert await reg(fn, "FAILED_ACCESSES") == 5


# --- writes ---------------------------------------------------------------------------------


async def test_scratch_register(fn: PciFunction) -> None:
    off = REGISTER_BY_NAME["SCRATCH"].offset
    await fn.bar_write(2, off, (0xCAFEF00D).to_bytes(4, "little"))
    assert await read(fn, off, 4) == 0xCAFEF00D
    await fn.bar_write(2, off + 1, b"\x11")
    await fn.bar_write(2, off + 2, b"\x22\x33")
    assert await read(fn, off, 4) == 0x3322110D
    await fn.bar_write(2, off, (0xFFFFFFFF_12345678).to_bytes(8, "little"))
    assert await read(fn, off, 8) == 0x12345678  # the upper half (0x1C) is reserved
    assert fn.registers.scratch == 0x12345678
    fn.reset()
    assert await read(fn, off, 4) == 0


async def test_read_only_and_unlisted_writes_are_ignored_not_counted(fn: PciFunction) -> None:
    before = await fn.bar_read(2, 0, 8)
    await fn.bar_write(2, 0, b"\xff" * 8)
    await fn.bar_write(2, REGISTER_BY_NAME["TRAPPED_READS"].offset, b"\xff" * 8)
    for off in (0x1C, 0x60, 0x7F8, 0xFF8, MSIX_PBA_OFFSET):
        await fn.bar_write(2, off, b"\xff" * 4)
        assert await read(fn, off, 4) == 0
    assert await fn.bar_read(2, 0, 8) == before
    assert await reg(fn, "TRAPPED_READS") == 0
    assert fn.counters.bad_accesses == 0


@pytest.mark.parametrize(
    ("offset", "size", "expected"),
    [
        (0, 3, errno.EINVAL),
        (0, 16, errno.EINVAL),
        (0, 0, errno.EINVAL),
        (2, 4, errno.EINVAL),
        (4, 8, errno.EINVAL),
        (0xFFF, 2, errno.EINVAL),
        (0x1000, 4, errno.EFAULT),
        (0x1000, 1, errno.EFAULT),
        (-4, 4, errno.EFAULT),
    ],
)
async def test_bad_shapes(fn: PciFunction, offset: int, size: int, expected: int) -> None:
    with pytest.raises(AccessError) as info:
        await fn.bar_read(2, offset, size)
    assert info.value.errno == expected
    with pytest.raises(AccessError) as info:
        await fn.bar_write(2, offset, b"\0" * size)
    assert info.value.errno == expected
    assert fn.counters.bad_accesses == 2


# --- MSI-X table and PBA -------------------------------------------------------------------


async def test_msix_table_power_on_and_masks(fn: PciFunction) -> None:
    for v in range(MSIX_VECTORS):
        entry = MSIX_TABLE_OFFSET + 16 * v
        assert await read(fn, entry, 8) == 0
        assert await read(fn, entry + 12, 4) == 1  # masked
    entry = MSIX_TABLE_OFFSET + 16
    await fn.bar_write(2, entry, (0x0000_0001_FEE0_0003).to_bytes(8, "little"))
    await fn.bar_write(2, entry + 8, (0x4021).to_bytes(4, "little"))
    await fn.bar_write(2, entry + 12, (0xFFFF_FFFE).to_bytes(4, "little"))
    assert await read(fn, entry, 8) == 0x0000_0001_FEE0_0000  # dword-aligned address
    assert await read(fn, entry + 12, 4) == 0  # only the mask bit is writable
    assert fn.registers.msix_entry(1) == (0x1_FEE0_0000, 0x4021, False)
    assert fn.registers.msix_entry(0)[2] is True
    # Past the table's last entry: reserved, reads 0.
    await fn.bar_write(2, MSIX_TABLE_OFFSET + 16 * MSIX_VECTORS, b"\xff" * 4)
    assert await read(fn, MSIX_TABLE_OFFSET + 16 * MSIX_VECTORS, 4) == 0
    fn.reset()
    assert fn.registers.msix_entry(1) == (0, 0, True)


async def test_pba_reflects_pending_msix_vectors(fn: PciFunction) -> None:
    assert await read(fn, MSIX_PBA_OFFSET, 8) == 0
    # No eventfd attached: the trigger is held pending, and the PBA says so.
    assert not fn.irqs.trigger(IrqIndex.MSIX, 1)
    assert not fn.irqs.trigger(IrqIndex.MSIX, 3)
    assert await read(fn, MSIX_PBA_OFFSET, 8) == 0b1010
    assert await read(fn, MSIX_PBA_OFFSET, 1) == 0b1010
    fn.irqs.clear_pending(IrqIndex.MSIX, 1)
    assert await read(fn, MSIX_PBA_OFFSET, 4) == 0b1000
