"""The interrupt source: BAR2's DOORBELL and IRQ_STATUS, INTx as a level, the message model.

Over vfio-user the function signals by vector through `irqs` (eventfds here); with
`msi_output`/`intx_output` set (the Xen transport) it composes MSI messages and drives the INTx
line itself. Both are checked with real eventfds or recording callbacks, no clocks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devmodel.aperture import OwnedMemory
from devmodel.counters import DeviceCounters
from devmodel.pci import config_space as cs
from devmodel.pci.function import PciFunction
from devmodel.pci.identity import PciIdentity
from devmodel.pci.irqs import IrqIndex, IrqSetFlag
from devmodel.pci.registers import MSIX_TABLE_OFFSET, REGISTER_BY_NAME

EVENTFD_TRIGGER = IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER
DOORBELL = REGISTER_BY_NAME["DOORBELL"].offset
IRQ_STATUS = REGISTER_BY_NAME["IRQ_STATUS"].offset
INTERRUPTS = REGISTER_BY_NAME["INTERRUPTS"].offset


def _new_function() -> PciFunction:
    return PciFunction(PciIdentity(), OwnedMemory(2 << 20), DeviceCounters())


@pytest.fixture
def fn() -> Iterator[PciFunction]:
    f = _new_function()
    yield f
    f.close()
    f.aperture.close()


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _drain(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def ring(fn: PciFunction, vector: int = 0) -> None:
    assert fn.register_write_now(DOORBELL, vector.to_bytes(4, "little"))


def ack(fn: PciFunction) -> None:
    assert fn.register_write_now(IRQ_STATUS, b"\x01\0\0\0")


def reg(fn: PciFunction, offset: int, size: int = 4) -> int:
    data = fn.register_read_now(offset, size)
    assert data is not None
    return int.from_bytes(data, "little")


def status_interrupt(fn: PciFunction) -> bool:
    return bool(int.from_bytes(fn.config_read(cs.STATUS, 2), "little") & cs.STS_INTERRUPT)


def command(fn: PciFunction, bits: int) -> None:
    fn.config_write(cs.COMMAND, bits.to_bytes(2, "little"))


def intx_eventfd(fn: PciFunction) -> int:
    fd = _eventfd()
    fn.irqs.set_irqs(EVENTFD_TRIGGER, IrqIndex.INTX, 0, 1, fds=[fd])
    return fd


# --- INTx over eventfds (vfio-user) ---------------------------------------------------------


def test_doorbell_asserts_intx_until_acknowledged(fn: PciFunction) -> None:
    fd = intx_eventfd(fn)
    assert reg(fn, DOORBELL) == 0 and reg(fn, IRQ_STATUS) == 0 and not status_interrupt(fn)
    ring(fn)
    assert _drain(fd) == 1
    assert reg(fn, IRQ_STATUS) == 1 and status_interrupt(fn) and fn.intx_asserted
    assert reg(fn, DOORBELL) == 0, "the doorbell is write-only"
    ring(fn)  # already asserted, and automasked: no second edge
    assert _drain(fd) == 0
    assert reg(fn, INTERRUPTS, 8) == 2
    # The client's EOI unmasks while the line is still up: it fires again (vfio-pci semantics).
    fn.irqs.set_irqs(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_UNMASK, IrqIndex.INTX, 0, 1)
    assert _drain(fd) == 1
    ack(fn)
    assert reg(fn, IRQ_STATUS) == 0 and not status_interrupt(fn)
    fn.irqs.set_irqs(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_UNMASK, IrqIndex.INTX, 0, 1)
    assert _drain(fd) == 0, "a line that fell before the unmask fires nothing"
    ring(fn)
    assert _drain(fd) == 1


def test_intx_disable_masks_the_pin_not_the_status(fn: PciFunction) -> None:
    """What uio_pci_generic does: mask with the command register when the status bit says the
    interrupt is ours, acknowledge the device, then unmask."""
    fd = intx_eventfd(fn)
    for _ in range(3):
        ring(fn)
        assert _drain(fd) == 1
        assert status_interrupt(fn)
        command(fn, cs.CMD_MEMORY | cs.CMD_INTX_DISABLE)  # the guest's handler masks
        assert status_interrupt(fn), "Interrupt Status ignores Interrupt Disable"
        ack(fn)  # the guest program acknowledges the device (a BAR access: QEMU's EOI)
        fn.irqs.unmask(IrqIndex.INTX)
        command(fn, cs.CMD_MEMORY)  # and unmasks the pin
        assert _drain(fd) == 0
    # Rung while the pin is masked: asserted, signalled only once the pin is unmasked.
    command(fn, cs.CMD_INTX_DISABLE)
    ring(fn)
    assert _drain(fd) == 0 and status_interrupt(fn)
    command(fn, 0)
    assert _drain(fd) == 1
    assert fn.counters.interrupts == 4


def test_reset_deasserts(fn: PciFunction) -> None:
    fd = intx_eventfd(fn)
    ring(fn)
    assert _drain(fd) == 1
    fn.reset()
    assert not fn.intx_asserted and not status_interrupt(fn) and reg(fn, IRQ_STATUS) == 0
    fn.irqs.unmask(IrqIndex.INTX)
    assert _drain(fd) == 0


def test_intx_without_eventfd_is_delivered_when_one_is_attached(fn: PciFunction) -> None:
    ring(fn)
    assert fn.irqs.pending(IrqIndex.INTX, 0)
    fd = intx_eventfd(fn)
    assert _drain(fd) == 1


def test_msi_enable_takes_the_line_away_from_intx(fn: PciFunction) -> None:
    fd = intx_eventfd(fn)
    ring(fn)
    assert _drain(fd) == 1
    fn.irqs.unmask(IrqIndex.INTX)
    assert _drain(fd) == 1  # still up
    fn.config_write(cs.MSI_CONTROL, b"\x01")
    fn.irqs.unmask(IrqIndex.INTX)
    assert _drain(fd) == 0, "with MSI on the function drives no INTx"


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_doorbell_write_shapes(fn: PciFunction, size: int) -> None:
    """Any write that covers DOORBELL rings it with the bytes written (zeros for the rest);
    an 8-byte write covers IRQ_STATUS too."""
    msix = [_eventfd() for _ in range(4)]
    fn.irqs.set_irqs(EVENTFD_TRIGGER, IrqIndex.MSIX, 0, 4, fds=msix)
    command(fn, cs.CMD_BUS_MASTER)
    fn.config_write(cs.MSIX_CONTROL, cs.MSIX_CTL_ENABLE.to_bytes(2, "little"))
    assert fn.register_write_now(DOORBELL, (3).to_bytes(size, "little"))
    assert [_drain(fd) for fd in msix] == [0, 0, 0, 1]
    assert not fn.register_write_now(DOORBELL + 1, b"\0\0")  # unaligned: refused
    assert reg(fn, INTERRUPTS, 8) == 1


def test_msix_doorbell_vectors_and_pba(fn: PciFunction) -> None:
    command(fn, cs.CMD_BUS_MASTER)
    fn.config_write(cs.MSIX_CONTROL, cs.MSIX_CTL_ENABLE.to_bytes(2, "little"))
    ring(fn, 2)  # no eventfd attached (QEMU detached the vector): pending, in the PBA
    assert fn.irqs.pending_bits(IrqIndex.MSIX) == 0b100
    fd = _eventfd()
    fn.irqs.set_irqs(EVENTFD_TRIGGER, IrqIndex.MSIX, 2, 1, fds=[fd])
    assert _drain(fd) == 1
    ring(fn, 4)
    ring(fn, 0xFFFF_FFFF)
    assert fn.counters.interrupts == 1, "vectors the function lacks raise nothing"


# --- the message model (Xen) -----------------------------------------------------------------


class Recorder:
    def __init__(self, fn: PciFunction) -> None:
        self.msis: list[tuple[int, int]] = []
        self.levels: list[bool] = []
        fn.msi_output = lambda address, data: self.msis.append((address, data))
        fn.intx_output = self.levels.append


def test_message_model_intx_levels(fn: PciFunction) -> None:
    out = Recorder(fn)
    ring(fn)
    ring(fn)
    command(fn, cs.CMD_INTX_DISABLE)
    command(fn, 0)
    ack(fn)
    fn.reset()
    assert out.levels == [True, False, True, False]
    assert out.msis == []


def test_message_model_msi(fn: PciFunction) -> None:
    out = Recorder(fn)
    fn.config_write(cs.MSI_ADDRESS_LO, (0xFEE0_1000).to_bytes(4, "little"))
    fn.config_write(cs.MSI_DATA, (0x4041).to_bytes(2, "little"))
    fn.config_write(cs.MSI_CONTROL, b"\x01")
    ring(fn)
    assert out.msis == [], "no bus mastering, no message"
    command(fn, cs.CMD_BUS_MASTER)
    ring(fn)
    assert out.msis == [(0xFEE0_1000, 0x4041)]
    assert out.levels == []


def test_message_model_msix_masks_and_pba(fn: PciFunction) -> None:
    out = Recorder(fn)
    command(fn, cs.CMD_BUS_MASTER)
    fn.config_write(
        cs.MSIX_CONTROL, (cs.MSIX_CTL_ENABLE | cs.MSIX_CTL_FUNCTION_MASK).to_bytes(2, "little")
    )
    entry = MSIX_TABLE_OFFSET + 16 * 1
    assert fn.register_write_now(entry, (0xFEE0_0000).to_bytes(8, "little"))
    assert fn.register_write_now(entry + 8, (0x31).to_bytes(4, "little"))
    ring(fn, 1)  # entry masked (power-on) and function masked: pending
    assert out.msis == [] and fn.irqs.pending_bits(IrqIndex.MSIX) == 0b10
    pba = REGISTER_BY_NAME["MSIX_PBA"].offset
    assert reg(fn, pba) == 0b10
    assert fn.register_write_now(entry + 12, b"\0\0\0\0")  # unmask the entry
    assert out.msis == [], "the function mask still holds it"
    fn.config_write(cs.MSIX_CONTROL, cs.MSIX_CTL_ENABLE.to_bytes(2, "little"))
    assert out.msis == [(0xFEE0_0000, 0x31)]
    assert reg(fn, pba) == 0
    ring(fn, 1)
    assert out.msis == [(0xFEE0_0000, 0x31)] * 2
    assert fn.counters.interrupts == 2


# --- a signaller that keeps the eventfds itself (libvfio-user) -----------------------------


def test_external_signal_failure_leaves_pending(fn: PciFunction) -> None:
    sent: list[tuple[int, int]] = []
    ok = [False]

    def external(index: int, vector: int) -> bool:
        if ok[0]:
            sent.append((index, vector))
        return ok[0]

    fn.irqs.external = external
    ring(fn)
    assert sent == [] and fn.irqs.pending(IrqIndex.INTX, 0)
    ok[0] = True
    fn.irqs.unmask(IrqIndex.INTX)
    assert sent == [(IrqIndex.INTX, 0)]
    assert fn.irqs.masked(IrqIndex.INTX, 0), "INTx is automasked after each signal"


# --- the INTx rules under any sequence --------------------------------------------------------

_OPS = st.sampled_from(["ring", "ack", "unmask", "disable", "enable", "reset", "attach"])


@settings(max_examples=150, deadline=None)
@given(st.lists(_OPS, max_size=30))
def test_intx_rules_hold_for_any_sequence(ops: list[str]) -> None:
    """Interrupt Status always equals IRQ_STATUS and the device's level; nothing is ever
    signalled while the pin is down; a rising pin or an unmask of a raised pin signals at once
    when an eventfd is attached and the vector unmasked."""
    fn = _new_function()
    fd = -1
    try:
        for op in ops:
            masked_before = fn.irqs.masked(IrqIndex.INTX, 0)
            line_before = fn.intx_asserted and not fn.config.intx_disabled
            if op == "ring":
                ring(fn)
            elif op == "ack":
                ack(fn)
            elif op == "unmask":
                fn.irqs.unmask(IrqIndex.INTX)
            elif op == "disable":
                command(fn, cs.CMD_INTX_DISABLE)
            elif op == "enable":
                command(fn, 0)
            elif op == "reset":
                fn.reset()
            elif op == "attach" and fd < 0:
                fd = intx_eventfd(fn)
            line = fn.intx_asserted and not fn.config.intx_disabled
            signals = _drain(fd) if fd >= 0 else 0
            assert status_interrupt(fn) == fn.intx_asserted == bool(reg(fn, IRQ_STATUS))
            if not line:
                assert signals == 0
            elif fd >= 0 and (
                (not line_before and not masked_before and op != "reset")
                or (op == "unmask" and line_before)
            ):
                assert signals == 1, (op, line_before, masked_before)
            if signals:
                assert fn.irqs.masked(IrqIndex.INTX, 0)
    finally:
        fn.close()
        fn.aperture.close()
