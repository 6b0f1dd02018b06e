"""Interrupts from a running device model to a vfio-user client's eventfds, over both transports.

The client plays QEMU: it attaches eventfds with SET_IRQS, rings BAR2's DOORBELL with a region
write and watches its eventfds. A doorbell write is signalled before its reply is sent (by both
transports), so "signalled" is checked as soon as the write returns, and "not signalled" after a
later round trip; no test waits on a clock for an interrupt that should not come.
"""

from __future__ import annotations

import os
import select
import struct
from collections.abc import Iterator

import pytest

from devmodel.pci import config_space as cs
from devmodel.pci.registers import REGISTER_BY_NAME
from devmodel.testing import VfioUserClient
from pyvfio_user import constants as c
from pyvfio_user import events as ev
from tests.integration.launching import DevmodelProcess

BAR2, CONFIG = 2, 7
DOORBELL = REGISTER_BY_NAME["DOORBELL"].offset
IRQ_STATUS = REGISTER_BY_NAME["IRQ_STATUS"].offset
INTERRUPTS = REGISTER_BY_NAME["INTERRUPTS"].offset
TRIGGER_FDS = c.IRQ_SET_DATA_EVENTFD | c.IRQ_SET_ACTION_TRIGGER
UNMASK = c.IRQ_SET_DATA_NONE | c.IRQ_SET_ACTION_UNMASK
# Generous: only a broken device model ever gets near it.
SIGNAL_TIMEOUT_MS = 10_000


@pytest.fixture
def client(devmodel: DevmodelProcess) -> Iterator[VfioUserClient]:
    with VfioUserClient(devmodel.socket_path) as cl:
        cl.attach()
        yield cl


def eventfds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)]


def drain(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def signalled(fd: int) -> int:
    """The count the device signalled on `fd`; waits (bounded) for the first signal."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    assert poller.poll(SIGNAL_TIMEOUT_MS), "no interrupt signalled"
    return drain(fd)


def set_irqs(cl: VfioUserClient, flags: int, index: int, start: int, count: int,
             fds: tuple[int, ...] = ()) -> None:  # fmt: skip
    cl.request(ev.DeviceSetIrqs(cl.next_id(), flags, index, start, count, fds=fds))


def ring(cl: VfioUserClient, vector: int) -> None:
    cl.write(BAR2, DOORBELL, struct.pack("<I", vector))


def config_u16(cl: VfioUserClient, offset: int, value: int) -> None:
    cl.write(CONFIG, offset, struct.pack("<H", value))


def test_intx_is_a_level_until_acknowledged(client: VfioUserClient) -> None:
    cl = client
    (fd,) = eventfds(1)
    try:
        set_irqs(cl, TRIGGER_FDS, c.PciIrq.INTX, 0, 1, (fd,))
        ring(cl, 0)
        assert signalled(fd) == 1
        assert cl.read_u32(BAR2, IRQ_STATUS) == 1
        status = struct.unpack("<H", cl.read(CONFIG, cs.STATUS, 2))[0]
        assert status & cs.STS_INTERRUPT, "config status shows the pending INTx"
        ring(cl, 0)  # still asserted and automasked: no second edge
        assert cl.read_u32(BAR2, IRQ_STATUS) == 1
        assert drain(fd) == 0
        # The client's EOI: unmask while the line is still up fires again.
        set_irqs(cl, UNMASK, c.PciIrq.INTX, 0, 1)
        assert signalled(fd) == 1
        cl.write(BAR2, IRQ_STATUS, struct.pack("<I", 1))  # acknowledge: deasserted
        set_irqs(cl, UNMASK, c.PciIrq.INTX, 0, 1)
        assert cl.read_u32(BAR2, IRQ_STATUS) == 0
        status = struct.unpack("<H", cl.read(CONFIG, cs.STATUS, 2))[0]
        assert not status & cs.STS_INTERRUPT
        assert drain(fd) == 0
        assert cl.read_u64(BAR2, INTERRUPTS) == 2
    finally:
        os.close(fd)


def test_msix_doorbell_signals_its_vector(client: VfioUserClient) -> None:
    cl = client
    fds = eventfds(4)
    try:
        # As QEMU does: INTx off, bus mastering and MSI-X on, one eventfd per vector.
        set_irqs(cl, c.IRQ_SET_DATA_NONE | c.IRQ_SET_ACTION_TRIGGER, c.PciIrq.INTX, 0, 0)
        config_u16(cl, cs.COMMAND, cs.CMD_MEMORY | cs.CMD_BUS_MASTER)
        config_u16(cl, cs.MSIX_CONTROL, cs.MSIX_CTL_ENABLE)
        set_irqs(cl, TRIGGER_FDS, c.PciIrq.MSIX, 0, 4, tuple(fds))
        ring(cl, 2)
        assert signalled(fds[2]) == 1
        ring(cl, 4)  # no such vector: nothing raised, nothing counted
        ring(cl, 0)
        assert signalled(fds[0]) == 1
        assert [drain(fd) for fd in fds] == [0, 0, 0, 0]
        assert cl.read_u64(BAR2, INTERRUPTS) == 2
    finally:
        for fd in fds:
            os.close(fd)


def test_msix_vector_without_eventfd_is_delivered_once_attached(client: VfioUserClient) -> None:
    """QEMU detaches a vector's eventfd while the guest masks it: an interrupt raised then is
    kept pending and signalled when an eventfd is attached again."""
    cl = client
    fds = eventfds(4)
    try:
        config_u16(cl, cs.COMMAND, cs.CMD_MEMORY | cs.CMD_BUS_MASTER)
        config_u16(cl, cs.MSIX_CONTROL, cs.MSIX_CTL_ENABLE)
        ring(cl, 1)  # nothing attached yet
        set_irqs(cl, TRIGGER_FDS, c.PciIrq.MSIX, 0, 4, tuple(fds))
        assert signalled(fds[1]) == 1
        assert [drain(fd) for fd in fds] == [0, 0, 0, 0]
        assert cl.read_u64(BAR2, INTERRUPTS) == 1
    finally:
        for fd in fds:
            os.close(fd)


def test_irq_info_flags(client: VfioUserClient, transport: str) -> None:
    """Expected difference 7 (README, "Choosing a transport"): libvfio-user reports EVENTFD
    alone; devmodel's own server reports what Linux vfio-pci does."""
    infos = [client.request(ev.DeviceGetIrqInfo(client.next_id(), i)) for i in range(5)]
    counts = [info.count for info in infos]
    assert counts == [1, 1, 4, 0, 1]
    flags = [info.flags for info in infos]
    eventfd = c.IRQ_INFO_EVENTFD
    if transport == "libvfio-user":
        assert flags == [eventfd] * 5
    else:
        intx = eventfd | c.IRQ_INFO_MASKABLE | c.IRQ_INFO_AUTOMASKED
        assert flags == [intx] + [eventfd | c.IRQ_INFO_NORESIZE] * 4


def test_intx_unmask_eventfd(client: VfioUserClient, transport: str) -> None:
    """QEMU under KVM hands INTx an unmask eventfd (KVM's resample fd) and signals it at the
    guest's EOI instead of sending UNMASK. Devmodel's own server waits on it; libvfio-user
    closes it (expected difference 8): there only UNMASK messages unmask INTx."""
    cl = client
    trigger, unmask = eventfds(2)
    try:
        set_irqs(cl, TRIGGER_FDS, c.PciIrq.INTX, 0, 1, (trigger,))
        set_irqs(cl, c.IRQ_SET_DATA_EVENTFD | c.IRQ_SET_ACTION_UNMASK, c.PciIrq.INTX, 0, 1,
                 (unmask,))  # fmt: skip
        ring(cl, 0)
        assert signalled(trigger) == 1
        os.eventfd_write(unmask, 1)  # the EOI, the line still asserted
        if transport == "libvfio-user":
            assert cl.read_u32(BAR2, IRQ_STATUS) == 1  # a round trip: nothing came
            assert drain(trigger) == 0
            return
        assert signalled(trigger) == 1, "unmasked through the eventfd: fires again"
        cl.write(BAR2, IRQ_STATUS, struct.pack("<I", 1))
        os.eventfd_write(unmask, 1)
        ring(cl, 0)  # signalled once the watcher has unmasked (now, or when it catches up)
        assert signalled(trigger) == 1
    finally:
        os.close(trigger)
        os.close(unmask)
