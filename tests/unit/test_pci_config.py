"""Config-space conformance: identity, read-only bits, BAR sizing, ROM, command, status, reset."""

from __future__ import annotations

import errno
import functools
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devmodel.aperture import OwnedMemory
from devmodel.counters import DeviceCounters
from devmodel.pci import config_space as cs
from devmodel.pci.function import AccessError, PciFunction
from devmodel.pci.identity import PciIdentity, parse_pci_id
from devmodel.pci.registers import MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, MSIX_VECTORS

MiB, GiB = 1 << 20, 1 << 30
IDENTITY = PciIdentity(
    vendor_id=0x1AF4, device_id=0x10F0, subsystem_vendor_id=0x5853, subsystem_id=0x0001,
    class_code=0x058001, revision=7,
)


def make(size: int = MiB, identity: PciIdentity = IDENTITY) -> PciFunction:
    granule = 4096 if size < 2 * MiB else 2 * MiB
    return PciFunction(identity, OwnedMemory(size, granule), DeviceCounters())


@pytest.fixture
def fn() -> Iterator[PciFunction]:
    f = make()
    yield f
    f.close()
    f.aperture.close()


def u8(f: PciFunction, off: int) -> int:
    return f.config_read(off, 1)[0]


def u16(f: PciFunction, off: int) -> int:
    return int.from_bytes(f.config_read(off, 2), "little")


def u32(f: PciFunction, off: int) -> int:
    return int.from_bytes(f.config_read(off, 4), "little")


def w16(f: PciFunction, off: int, value: int) -> None:
    f.config_write(off, value.to_bytes(2, "little"))


def w32(f: PciFunction, off: int, value: int) -> None:
    f.config_write(off, value.to_bytes(4, "little"))


# --- identity -----------------------------------------------------------------------------


def test_identity_registers(fn: PciFunction) -> None:
    assert u16(fn, cs.VENDOR_ID) == 0x1AF4
    assert u16(fn, cs.DEVICE_ID) == 0x10F0
    assert u8(fn, cs.REVISION_ID) == 7
    assert int.from_bytes(fn.config_read(cs.CLASS_CODE, 3), "little") == 0x058001
    assert u16(fn, cs.SUBSYSTEM_VENDOR_ID) == 0x5853
    assert u16(fn, cs.SUBSYSTEM_ID) == 0x0001
    assert u8(fn, cs.HEADER_TYPE) == 0
    assert u8(fn, cs.INTERRUPT_PIN) == 1
    assert u16(fn, cs.STATUS) == cs.STS_CAP_LIST
    assert u8(fn, cs.CAPABILITIES_POINTER) == cs.MSI_CAP


def test_default_identity() -> None:
    f = make(identity=PciIdentity())
    assert f.config_read(0, 4) == bytes.fromhex("3412e510")
    assert int.from_bytes(f.config_read(cs.CLASS_CODE, 3), "little") == 0x050000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1234:10e5", (0x1234, 0x10E5)),
        ("1AF4:0001", (0x1AF4, 1)),
        (" 8086:abcd\n", (0x8086, 0xABCD)),
    ],
)
def test_parse_pci_id(text: str, expected: tuple[int, int]) -> None:
    assert parse_pci_id(text) == expected


@pytest.mark.parametrize("text", ["", "1234", "1234:", "12345:0001", "0x1234:0x10e5", "zzzz:0000",
                                  "1234-10e5", "ffff:0001"])
def test_parse_pci_id_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"PCI ID|ffff"):
        parse_pci_id(text)


@pytest.mark.parametrize(
    "kwargs",
    [{"vendor_id": 0xFFFF}, {"vendor_id": 0x10000}, {"device_id": -1},
     {"class_code": 1 << 24}, {"revision": 256}, {"subsystem_id": 0x10000}],
)
def test_identity_validates(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        PciIdentity(**kwargs)


# --- access shape ---------------------------------------------------------------------------


def test_whole_space_read_matches_pieces(fn: PciFunction) -> None:
    whole = fn.config_read(0, 256)
    assert len(whole) == 256
    assert b"".join(fn.config_read(off, 4) for off in range(0, 256, 4)) == whole
    assert fn.config_read(0x3D, 3) == whole[0x3D:0x40]  # unaligned and odd-sized is fine
    assert fn.config_read(0xFF, 1) == whole[0xFF:]
    assert fn.counters.bad_accesses == 0


@pytest.mark.parametrize(("offset", "size"), [(256, 1), (255, 2), (0, 257), (-1, 1), (0x100, 0)])
def test_out_of_range_config_access(fn: PciFunction, offset: int, size: int) -> None:
    with pytest.raises(AccessError) as info:
        fn.config_read(offset, size)
    assert info.value.errno == errno.EFAULT
    with pytest.raises(AccessError):
        fn.config_write(offset, b"\xff" * size)
    assert fn.counters.bad_accesses == 2


# --- BARs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [MiB, 256 * MiB, 4 * GiB, 64 * GiB, 1 << 40])
def test_bar0_sizing_64bit(size: int) -> None:
    f = make(size)
    assert u32(f, 0x10) == 0b1100  # memory, 64-bit, prefetchable; address 0
    assert u32(f, 0x14) == 0
    w32(f, 0x10, 0xFFFFFFFF)
    w32(f, 0x14, 0xFFFFFFFF)
    lo, hi = u32(f, 0x10), u32(f, 0x14)
    assert lo & 0xF == 0b1100
    mask = (hi << 32 | lo) & ~0xF
    assert (~mask + 1) & (1 << 64) - 1 == size
    # Program a real address (aligned to the size) and read it back.
    address = 3 * size if size <= 64 * GiB else size
    w32(f, 0x10, address & 0xFFFFFFFF)
    w32(f, 0x14, address >> 32)
    assert (u32(f, 0x14) << 32 | u32(f, 0x10)) == address | 0b1100
    assert f.bar_address(0) is None  # decoding off
    w16(f, cs.COMMAND, cs.CMD_MEMORY)
    assert f.bar_address(0) == address
    assert f.region_size(0) == size and f.region_size(1) == 0
    f.aperture.close()


def test_bar0_partial_byte_writes_keep_type_bits(fn: PciFunction) -> None:
    fn.config_write(0x10, b"\xff")
    assert u32(fn, 0x10) == 0b1100  # 1 MiB: the low byte has no address bits
    fn.config_write(0x12, b"\xff\xff")
    assert u32(fn, 0x10) == 0xFFF0000C


def test_bar2_sizing_32bit(fn: PciFunction) -> None:
    assert u32(fn, 0x18) == 0
    w32(fn, 0x18, 0xFFFFFFFF)
    assert u32(fn, 0x18) == 0xFFFFF000  # 4 KiB, 32-bit, non-prefetchable
    w32(fn, 0x18, 0xFEBF1234)
    assert u32(fn, 0x18) == 0xFEBF1000
    w16(fn, cs.COMMAND, cs.CMD_MEMORY)
    assert fn.bar_address(2) == 0xFEBF1000


@pytest.mark.parametrize("reg", [0x1C, 0x20, 0x24, cs.CARDBUS_CIS, cs.EXPANSION_ROM])
def test_absent_bars_and_rom_read_zero(fn: PciFunction, reg: int) -> None:
    for value in (0xFFFFFFFF, 0xFFFFF801, 0x12345678):
        w32(fn, reg, value)
        assert u32(fn, reg) == 0


def test_absent_bars_have_no_address(fn: PciFunction) -> None:
    w16(fn, cs.COMMAND, cs.CMD_MEMORY)
    assert [fn.bar_address(b) for b in (1, 3, 4, 5)] == [None] * 4
    assert fn.bar_address(0) == 0 and fn.bar_address(2) == 0


# --- command, status, misc ------------------------------------------------------------------


def test_command_register_writable_bits(fn: PciFunction) -> None:
    w16(fn, cs.COMMAND, 0xFFFF)
    assert u16(fn, cs.COMMAND) == 0x0406
    assert fn.config.memory_enabled and fn.config.bus_master_enabled and fn.config.intx_disabled
    w16(fn, cs.COMMAND, 0)
    assert u16(fn, cs.COMMAND) == 0


def test_status_rw1c(fn: PciFunction) -> None:
    fn.config.set_status(cs.STS_SIGNALED_TARGET_ABORT | cs.STS_RECEIVED_MASTER_ABORT)
    assert u16(fn, cs.STATUS) == (
        cs.STS_CAP_LIST | cs.STS_SIGNALED_TARGET_ABORT | cs.STS_RECEIVED_MASTER_ABORT
    )
    w16(fn, cs.STATUS, 0)  # writing 0 changes nothing
    assert u16(fn, cs.STATUS) & cs.STS_SIGNALED_TARGET_ABORT
    w16(fn, cs.STATUS, cs.STS_SIGNALED_TARGET_ABORT)  # writing 1 clears just that bit
    assert u16(fn, cs.STATUS) == cs.STS_CAP_LIST | cs.STS_RECEIVED_MASTER_ABORT
    w16(fn, cs.STATUS, 0xFFFF)  # clears the rest; the capability bit is read-only
    assert u16(fn, cs.STATUS) == cs.STS_CAP_LIST


def test_status_interrupt_bit_is_device_owned(fn: PciFunction) -> None:
    fn.config.set_status(cs.STS_INTERRUPT)
    w16(fn, cs.STATUS, 0xFFFF)
    assert u16(fn, cs.STATUS) & cs.STS_INTERRUPT
    fn.config.clear_status(cs.STS_INTERRUPT)
    assert u16(fn, cs.STATUS) == cs.STS_CAP_LIST
    with pytest.raises(ValueError):
        fn.config.set_status(cs.STS_CAP_LIST)


@pytest.mark.parametrize("reg", [cs.CACHE_LINE_SIZE, cs.LATENCY_TIMER, cs.INTERRUPT_LINE])
def test_byte_registers_writable(fn: PciFunction, reg: int) -> None:
    fn.config_write(reg, b"\x5a")
    assert u8(fn, reg) == 0x5A


@pytest.mark.parametrize(
    "reg", [cs.INTERRUPT_PIN, cs.HEADER_TYPE, cs.BIST, cs.MIN_GNT, cs.MAX_LAT,
            cs.CAPABILITIES_POINTER, cs.REVISION_ID]
)
def test_byte_registers_read_only(fn: PciFunction, reg: int) -> None:
    before = u8(fn, reg)
    fn.config_write(reg, b"\xa5")
    assert u8(fn, reg) == before


# --- capabilities ---------------------------------------------------------------------------


def test_capability_list(fn: PciFunction) -> None:
    found = []
    pointer = u8(fn, cs.CAPABILITIES_POINTER)
    while pointer:
        assert pointer % 4 == 0 and pointer >= 0x40
        found.append((pointer, u8(fn, pointer)))
        pointer = u8(fn, pointer + 1)
    assert found == [(0x40, cs.CAP_ID_MSI), (0x50, cs.CAP_ID_MSIX)]


def test_msi_capability(fn: PciFunction) -> None:
    control = u16(fn, cs.MSI_CONTROL)
    assert control & cs.MSI_CTL_64BIT
    assert control & 0b1110 == 0  # multiple message capable: 1 vector
    w16(fn, cs.MSI_CONTROL, 0xFFFF)
    assert u16(fn, cs.MSI_CONTROL) == cs.MSI_CTL_64BIT | cs.MSI_CTL_ENABLE
    assert fn.config.msi_enabled
    w32(fn, cs.MSI_ADDRESS_LO, 0xFEE01007)
    w32(fn, cs.MSI_ADDRESS_HI, 0x1)
    w16(fn, cs.MSI_DATA, 0x4041)
    assert u32(fn, cs.MSI_ADDRESS_LO) == 0xFEE01004  # dword aligned
    assert fn.config.msi_message() == (0x1_FEE01004, 0x4041)


def test_msix_capability(fn: PciFunction) -> None:
    assert u16(fn, cs.MSIX_CONTROL) == MSIX_VECTORS - 1
    assert u32(fn, cs.MSIX_TABLE) == MSIX_TABLE_OFFSET | 2
    assert u32(fn, cs.MSIX_PBA) == MSIX_PBA_OFFSET | 2
    w16(fn, cs.MSIX_CONTROL, 0xFFFF)
    assert u16(fn, cs.MSIX_CONTROL) == 0xC000 | (MSIX_VECTORS - 1)
    assert fn.config.msix_enabled and fn.config.msix_function_masked
    w32(fn, cs.MSIX_TABLE, 0)
    assert u32(fn, cs.MSIX_TABLE) == MSIX_TABLE_OFFSET | 2
    assert fn.irqs.info(2)[1] == MSIX_VECTORS
    assert fn.irqs.info(1)[1] == 1


# --- reset and decode notifications ---------------------------------------------------------


def test_reset_restores_power_on_values(fn: PciFunction) -> None:
    power_on = fn.config_read(0, 256)
    w32(fn, 0x10, 0xFFFFFFFF)
    w32(fn, 0x14, 0x12345678)
    w32(fn, 0x18, 0xFEB00000)
    w16(fn, cs.COMMAND, 0xFFFF)
    w16(fn, cs.MSI_CONTROL, 1)
    w16(fn, cs.MSIX_CONTROL, 0xC000)
    fn.config_write(cs.INTERRUPT_LINE, b"\x0b")
    fn.config.set_status(cs.STS_RECEIVED_TARGET_ABORT)
    assert fn.config_read(0, 256) != power_on
    fn.reset()
    assert fn.config_read(0, 256) == power_on
    assert not fn.config.msi_enabled and not fn.config.msix_enabled
    assert fn.config.command == 0
    assert fn.counters.resets == 1


def test_decode_change_notifications(fn: PciFunction) -> None:
    calls: list[tuple[int | None, int | None]] = []
    fn.on_decode_change = lambda: calls.append((fn.bar_address(0), fn.bar_address(2)))
    w32(fn, 0x10, 0xC0000000)
    w32(fn, 0x18, 0xFE000000)
    assert calls == []  # decoding still off
    w16(fn, cs.COMMAND, cs.CMD_MEMORY)
    assert calls == [(0xC0000000, 0xFE000000)]
    fn.config_write(cs.INTERRUPT_LINE, b"\x05")
    assert len(calls) == 1  # nothing decode-related changed
    w32(fn, 0x14, 0x1)
    assert calls[-1] == (0x1_C0000000, 0xFE000000)
    fn.reset()
    assert len(calls) == 3
    assert (fn.bar_address(0), fn.bar_address(2)) == (None, None)


# --- the property: random writes never change read-only bits and never raise ---------------

_SIZES = (MiB, 64 * GiB)


@functools.cache
def _shared(size: int) -> PciFunction:
    """One function per size for all examples: hypothesis runs hundreds, reset() isolates."""
    return make(size)


def _masks(f: PciFunction) -> tuple[bytes, bytes]:
    wmask, w1c = bytearray(256), bytearray(256)
    for field in f.config.fields:
        span = slice(field.offset, field.offset + field.width)
        wmask[span] = field.wmask.to_bytes(field.width, "little")
        w1c[span] = field.w1c.to_bytes(field.width, "little")
    return bytes(wmask), bytes(w1c)


_writes = st.lists(
    st.integers(0, 255).flatmap(
        lambda off: st.tuples(st.just(off), st.binary(min_size=0, max_size=256 - off))
    ),
    max_size=20,
)


@settings(max_examples=300, deadline=None)
@given(size=st.sampled_from(_SIZES), writes=_writes)
def test_random_writes_keep_read_only_bits(size: int, writes: list[tuple[int, bytes]]) -> None:
    f = _shared(size)
    f.reset()
    power_on = f.config_read(0, 256)
    wmask, w1c = _masks(f)
    for offset, data in writes:
        f.config_write(offset, data)
    now = f.config_read(0, 256)
    for i in range(256):
        assert (now[i] ^ power_on[i]) & ~wmask[i] & 0xFF == 0, f"read-only bit changed at {i:#x}"
        assert now[i] & w1c[i] == 0, f"RW1C bit set by software at {i:#x}"
    # Identity and the capability structure are entirely read-only.
    assert now[0:4] == power_on[0:4] and now[8:12] == power_on[8:12]
    assert now[0x2C:0x30] == power_on[0x2C:0x30] and now[0x34] == 0x40
    assert now[0x40:0x42] == b"\x05\x50" and now[0x50:0x52] == b"\x11\x00"
    assert f.counters.bad_accesses == 0


def test_field_table_is_consistent(fn: PciFunction) -> None:
    end = 0
    for field in fn.config.fields:  # sorted, no overlap, widths sane, masks fit
        assert field.offset >= end
        assert field.width in (1, 2, 3, 4)
        assert field.reset >> (8 * field.width) == 0
        assert field.wmask & field.w1c == 0
        end = field.offset + field.width
    assert end <= 256
