"""BAR0 access matrix, region description, reset of the aperture, interrupt routing."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from devmodel.aperture import OwnedMemory
from devmodel.counters import DeviceCounters
from devmodel.pci import config_space as cs
from devmodel.pci.function import (
    REGION_CONFIG,
    REGION_ROM,
    REGION_VGA,
    AccessError,
    PciFunction,
)
from devmodel.pci.identity import PciIdentity
from devmodel.pci.irqs import IrqIndex, IrqSetFlag
from devmodel.pci.registers import REGISTER_BY_NAME

MiB = 1 << 20
BAR0 = 2 * MiB
EVENTFD_TRIGGER = IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER


@pytest.fixture
def fn() -> Iterator[PciFunction]:
    f = PciFunction(PciIdentity(), OwnedMemory(BAR0), DeviceCounters())
    yield f
    f.close()
    f.aperture.close()


# Each case: (size, offset, expected errno or None for success).
def _matrix() -> list[tuple[int, int, int | None]]:
    cases: list[tuple[int, int, int | None]] = []
    for size in (1, 2, 4, 8):
        cases += [
            (size, 0, None),  # first
            (size, 8 * size, None),  # aligned, inside
            (size, BAR0 - size, None),  # last aligned slot
            (size, BAR0, errno.EFAULT),  # just past the end
            (size, BAR0 + 4096, errno.EFAULT),  # well outside
            (size, 1 << 62, errno.EFAULT),  # absurd offset
            (size, -size, errno.EFAULT),  # negative (never from a wire; still refused)
        ]
        if size > 1:
            cases += [
                (size, 1, errno.EINVAL),  # unaligned inside
                (size, BAR0 - size + 1, errno.EINVAL),  # unaligned, crossing the end
                (size, BAR0 - 1, errno.EINVAL),  # unaligned, mostly outside
            ]
    for size in (0, 3, 5, 6, 7, 16, 4096):
        cases += [(size, 0, errno.EINVAL), (size, BAR0, errno.EINVAL)]
    return cases


@pytest.mark.parametrize(("size", "offset", "expected"), _matrix())
async def test_bar0_read_matrix(
    fn: PciFunction, size: int, offset: int, expected: int | None
) -> None:
    if expected is None:
        await fn.aperture.write(offset, bytes(range(1, size + 1)))
        assert await fn.bar_read(0, offset, size) == bytes(range(1, size + 1))
        assert (fn.counters.trapped_reads, fn.counters.bad_accesses) == (1, 0)
    else:
        with pytest.raises(AccessError) as info:
            await fn.bar_read(0, offset, size)
        assert info.value.errno == expected
        assert (fn.counters.trapped_reads, fn.counters.bad_accesses) == (0, 1)


@pytest.mark.parametrize(("size", "offset", "expected"), _matrix())
async def test_bar0_write_matrix(
    fn: PciFunction, size: int, offset: int, expected: int | None
) -> None:
    data = bytes((0xA0 + i) & 0xFF for i in range(size))
    if expected is None:
        await fn.bar_write(0, offset, data)
        assert await fn.aperture.read(offset, size) == data
        assert (fn.counters.trapped_writes, fn.counters.bad_accesses) == (1, 0)
    else:
        with pytest.raises(AccessError) as info:
            await fn.bar_write(0, offset, data)
        assert info.value.errno == expected
        assert (fn.counters.trapped_writes, fn.counters.bad_accesses) == (0, 1)


async def test_bar0_round_trip_and_little_endian_view(fn: PciFunction) -> None:
    await fn.bar_write(0, 0x1000, (0x1122334455667788).to_bytes(8, "little"))
    assert await fn.bar_read(0, 0x1000, 4) == bytes.fromhex("88776655")
    assert await fn.bar_read(0, 0x1004, 2) == bytes.fromhex("4433")
    assert await fn.bar_read(0, 0x1007, 1) == b"\x11"
    assert fn.counters.trapped_reads == 3 and fn.counters.trapped_writes == 1


@pytest.mark.parametrize("bar", [1, 3, 4, 5, REGION_ROM, REGION_CONFIG, REGION_VGA, 9, -1])
async def test_other_regions_refused(fn: PciFunction, bar: int) -> None:
    with pytest.raises(AccessError) as info:
        await fn.bar_read(bar, 0, 4)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(AccessError):
        await fn.bar_write(bar, 0, b"\0\0\0\0")
    assert fn.counters.bad_accesses == 2
    assert fn.counters.trapped_reads == fn.counters.trapped_writes == 0


def test_region_description(fn: PciFunction) -> None:
    sizes = [fn.region_size(i) for i in range(10)]
    assert sizes == [BAR0, 0, 4096, 0, 0, 0, 0, 256, 0, 0]
    assert fn.config_size == 256
    assert [fn.bar_is_64bit(b) for b in range(6)] == [True, False, False, False, False, False]
    assert [fn.bar_is_prefetchable(b) for b in range(6)] == [True] + [False] * 5
    assert not any(fn.bar_is_io(b) for b in range(6))


async def test_reset_discards_aperture_contents(fn: PciFunction) -> None:
    await fn.bar_write(0, 64, b"\xff" * 8)
    fn.reset()
    assert await fn.bar_read(0, 64, 8) == bytes(8)
    assert fn.counters.resets == 1


async def test_memory_enable_not_required_for_access(fn: PciFunction) -> None:
    # The client decides what it decodes; the device serves what it is sent (see function.py).
    assert not fn.config.memory_enabled
    await fn.bar_write(0, 0, b"\x01")
    assert await fn.bar_read(0, 0, 1) == b"\x01"


# --- interrupt routing -----------------------------------------------------------------------


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _drain(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_raise_interrupt_follows_config(fn: PciFunction) -> None:
    intx, msi, msix = _eventfd(), _eventfd(), [_eventfd() for _ in range(4)]
    fn.irqs.set_irqs(EVENTFD_TRIGGER, IrqIndex.INTX, 0, 1, fds=[intx])
    fn.irqs.set_irqs(EVENTFD_TRIGGER, IrqIndex.MSI, 0, 1, fds=[msi])
    fn.irqs.set_irqs(EVENTFD_TRIGGER, IrqIndex.MSIX, 0, 4, fds=msix)

    assert fn.raise_interrupt()  # power on: INTx
    assert _drain(intx) == 1
    fn.registers.write(REGISTER_BY_NAME["IRQ_STATUS"].offset, b"\x01")  # deassert
    fn.irqs.unmask(IrqIndex.INTX)
    assert _drain(intx) == 0

    fn.config_write(cs.COMMAND, cs.CMD_INTX_DISABLE.to_bytes(2, "little"))
    assert not fn.raise_interrupt()  # asserted, but the pin is masked
    assert _drain(intx) == 0
    fn.registers.write(REGISTER_BY_NAME["IRQ_STATUS"].offset, b"\x01")

    fn.config_write(cs.MSI_CONTROL, b"\x01")
    assert not fn.raise_interrupt()  # no bus mastering, no MSI
    fn.config_write(cs.COMMAND, (cs.CMD_BUS_MASTER | cs.CMD_INTX_DISABLE).to_bytes(2, "little"))
    assert not fn.raise_interrupt(vector=3)  # MSI has one vector: 0
    assert fn.raise_interrupt(vector=0)
    assert _drain(msi) == 1

    fn.config_write(cs.MSIX_CONTROL, (cs.MSIX_CTL_ENABLE).to_bytes(2, "little"))
    assert fn.raise_interrupt(vector=2)
    assert [_drain(fd) for fd in msix] == [0, 0, 1, 0]
    assert _drain(msi) == 0
    assert not fn.raise_interrupt(vector=4)  # no such vector: nothing raised
    assert fn.counters.interrupts == 4

    fn.close()
    for fd in [intx, msi, *msix]:
        with pytest.raises(OSError):
            os.fstat(fd)
