"""INTx unmask through an eventfd: what a vfio-user client under KVM sets up for level INTx.

QEMU with KVM routes INTx through an irqfd with a resample fd: at the guest's EOI, KVM signals
the resample fd instead of QEMU sending SET_IRQS UNMASK, and QEMU hands that fd to the device
as INTx's unmask eventfd (ACTION_UNMASK|DATA_EVENTFD). The IrqTable keeps it; this task waits
on it and unmasks INTx each time it is signalled, so that a line still asserted fires again
(irqs.py). QEMU under TCG (the test bed) sends UNMASK messages instead and sets no such fd.

The table may close or replace the fd at any SET_IRQS, so the task waits on a duplicate of its
own, and `changed` (called after every SET_IRQS of INTx) makes it drop that and look again.
"""

from __future__ import annotations

import contextlib
import logging
import os

import trio

from devmodel.pci.irqs import IrqIndex, IrqTable

__all__ = ["IntxUnmaskWatcher"]

log = logging.getLogger("devmodel.vfio_user")


class IntxUnmaskWatcher:
    """Unmasks INTx whenever the client's unmask eventfd is signalled (one per session)."""

    def __init__(self, irqs: IrqTable) -> None:
        self.irqs = irqs
        self.unmasks = 0
        self._scope: trio.CancelScope | None = None

    def changed(self, index: int) -> None:
        """A SET_IRQS of `index` was applied: INTx's unmask eventfd may have changed."""
        if index == IrqIndex.INTX and self._scope is not None:
            self._scope.cancel()

    async def run(self) -> None:
        """Until cancelled."""
        while True:
            with trio.CancelScope() as scope:
                self._scope = scope
                await self._watch(self.irqs.unmask_eventfd(IrqIndex.INTX))
            self._scope = None

    async def _watch(self, source: int) -> None:
        if source < 0:
            await trio.sleep_forever()
        try:
            fd = os.dup(source)
        except OSError as exc:  # out of descriptors: INTx then needs UNMASK messages
            log.warning("cannot watch the INTx unmask eventfd: %s", exc)
            await trio.sleep_forever()
        try:
            while True:
                await trio.lowlevel.wait_readable(fd)
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue  # another reader took it; nothing to do
                except OSError as exc:
                    log.warning("INTx unmask eventfd unusable (%s); ignoring it", exc)
                    await trio.sleep_forever()
                self.unmasks += 1
                self.irqs.unmask(IrqIndex.INTX)
        finally:
            trio.lowlevel.notify_closing(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
