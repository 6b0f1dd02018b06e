"""The function's interrupts on Xen: MSI and MSI-X messages injected, INTx as a line level.

Over vfio-user the client (QEMU) emulates the MSI and MSI-X capabilities and the function only
names a vector; on Xen nobody else does, so the function composes each message itself (from
its MSI capability or MSI-X table entry, honouring the masks and keeping the PBA: see
`PciFunction.msi_output`) and this module hands it to Xen:

- MSI / MSI-X: `xendevicemodel_inject_msi(domid, address, data)`, as QEMU-xen does for its
  emulated devices; Xen decodes the address and data and delivers to the guest's vLAPIC.
- INTx: `xendevicemodel_set_pci_intx_level(domid, segment, bus, device, pin, level)` with pin
  0 (INTA#, the function's INTERRUPT_PIN): 1 when the function's line rises, 0 when it falls
  (acknowledged in IRQ_STATUS, masked by the command register, or MSI turned on). Xen routes
  the level through the guest's PCI link routing to its virtual IOAPIC; hvmloader writes the
  resulting IRQ into INTERRUPT_LINE. A PVH guest has no IOAPIC: only MSI and MSI-X reach it.

A hypercall that fails is logged (rate-limited) and counted in `errors`; the interrupt is lost,
as a message to a destroyed domain would be. On stop a still asserted line is lowered, so the
guest's IOAPIC is not left with a level nobody will ever drop.
"""

from __future__ import annotations

import logging

from devmodel.pci.function import PciFunction
from devmodel.ratelimit import RateLimitedLogger
from devmodel.xen.platform import XenError, XenPlatform

__all__ = ["INTA", "XenInterrupts"]

log = logging.getLogger("devmodel.xen")

INTA = 0
"""Xen's numbering of the function's interrupt pin (INTERRUPT_PIN 1, INTA#)."""


class XenInterrupts:
    """Routes one PCI function's `msi_output` and `intx_output` to the hypervisor."""

    def __init__(
        self,
        platform: XenPlatform,
        sbdf: tuple[int, int, int, int],
        logger: RateLimitedLogger | None = None,
    ) -> None:
        self.platform = platform
        self.sbdf = sbdf
        self._log = logger or RateLimitedLogger(log)
        self.level = False
        self.injected = 0
        # Times the line went up, as Xen saw it: with `injected` and `errors`, what the log's
        # stop line reports (the Xen suite compares it with the guest's own count).
        self.raised = 0
        self.errors = 0
        self._function: PciFunction | None = None

    def install(self, function: PciFunction) -> None:
        function.msi_output = self.msi
        function.intx_output = self.intx
        self._function = function

    def summary(self) -> str:
        """For the stop line of the log: what reached the hypervisor, what failed."""
        return f"INTx raised {self.raised}, MSI injected {self.injected}, failed {self.errors}"

    def uninstall(self) -> None:
        """Detach from the function; lower the line if it is up."""
        function, self._function = self._function, None
        if function is not None:
            if function.msi_output == self.msi:
                function.msi_output = None
            if function.intx_output == self.intx:
                function.intx_output = None
        if self.level:
            self.intx(False)

    def msi(self, address: int, data: int) -> None:
        try:
            self.platform.inject_msi(address, data)
        except (XenError, OSError, ValueError) as exc:
            self.errors += 1
            self._log.warning("cannot inject MSI %#x/%#x: %s", address, data, exc)
            return
        self.injected += 1

    def intx(self, level: bool) -> None:
        segment, bus, device, _function = self.sbdf
        try:
            self.platform.set_pci_intx_level(segment, bus, device, INTA, int(level))
        except (XenError, OSError, ValueError) as exc:
            self.errors += 1
            self._log.warning("cannot set INTx to %d: %s", int(level), exc)
            return
        if level and not self.level:
            self.raised += 1
        self.level = level
