"""The INTx unmask eventfd watcher (KVM's resample fd): each signal unmasks INTx, and a
replaced fd is followed. Real eventfds in a trio loop; the only clock is a hang guard."""

from __future__ import annotations

import os

import trio
import trio.testing

from devmodel.pci.irqs import IrqIndex, IrqSetFlag, IrqTable
from devmodel.transports.intx_unmask import IntxUnmaskWatcher

TRIGGER = IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER
UNMASK_FD = IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_UNMASK
HANG_GUARD = 30


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


async def next_signal(fd: int) -> int:
    await trio.lowlevel.wait_readable(fd)
    return os.eventfd_read(fd)


async def test_each_signal_unmasks_and_a_replaced_fd_is_followed() -> None:
    irqs = IrqTable()
    # The table owns what it is given (duplicates here); the test keeps the client's ends.
    trigger, first = eventfd(), eventfd()
    irqs.set_irqs(TRIGGER, IrqIndex.INTX, 0, 1, fds=[os.dup(trigger)])
    irqs.set_irqs(UNMASK_FD, IrqIndex.INTX, 0, 1, fds=[os.dup(first)])
    watcher = IntxUnmaskWatcher(irqs)
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watcher.run)
            await trio.testing.wait_all_tasks_blocked()
            irqs.set_level(IrqIndex.INTX, 0, True)
            assert await next_signal(trigger) == 1
            assert irqs.masked(IrqIndex.INTX, 0)
            os.eventfd_write(first, 1)  # the EOI, line still up: fires again
            assert await next_signal(trigger) == 1
            assert watcher.unmasks == 1
            # The client replaces the unmask fd; the watcher follows it.
            second = eventfd()
            irqs.set_irqs(UNMASK_FD, IrqIndex.INTX, 0, 1, fds=[os.dup(second)])
            watcher.changed(IrqIndex.INTX)
            await trio.testing.wait_all_tasks_blocked()
            os.eventfd_write(second, 1)
            assert await next_signal(trigger) == 1
            assert watcher.unmasks == 2
            nursery.cancel_scope.cancel()
    irqs.close()
    for fd in (trigger, first, second):
        os.close(fd)
