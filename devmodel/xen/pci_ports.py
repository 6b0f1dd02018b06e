"""The PCI configuration ports (0xcf8-0xcff) for a guest that has no other device model.

An HVM guest's QEMU answers port 0xcf8 and Xen turns its config cycles for our function into
IOREQ_TYPE_PCI_CONFIG requests. A PVH guest has no QEMU: Xen latches 0xcf8 writes for its own
decoding but lets every 0xcf8 access fall through to whichever ioreq server claims the port,
and with none a read returns all-ones. Linux's conf1 probe (arch/x86/pci/direct.c,
`pci_check_type1`) writes 0x80000000 to 0xcf8 and reads it back, so it finds no config space
access at all (`PCI: Fatal: No config space access function found`) and never enumerates the
function. So, when asked to (`--pci-config-ports`), this server claims the ports and:

- latches CONFIG_ADDRESS: a 4-byte write at 0xcf8 is stored, a 4-byte read returns it;
  narrower accesses there (the old type 2 mechanism's registers) read all-ones, writes dropped;
- answers CONFIG_DATA (0xcfc-0xcff, 1/2/4 bytes) itself when Xen forwards it as port I/O: for
  the latched function if it is ours or the host bridge, all-ones for any other function or bus
  and whenever the latch's enable bit (31) is clear. (Xen decodes 0xcfc itself whenever its
  own latch is enabled and sends IOREQ_TYPE_PCI_CONFIG for a function a server claimed; those
  arrive through the usual path.)
- presents a host bridge at 00:00.0, class 0x060000, because `pci_sanity_check` accepts type 1
  only if some function on bus 0 is a host bridge or VGA (or has Intel's or Compaq's vendor
  id); machines with DMI from 2001 on skip that check, but a PVH guest has no DMI. The bridge
  is `HOST_BRIDGE_ID`, has no BARs and ignores writes; its config cycles are claimed with
  map_pcidev like the function's.

Pure: no platform calls here (the server claims the ports and the bridge, see `claims`), so the
tests drive it with plain calls and through the simulated hypervisor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

__all__ = [
    "CONFIG_ADDRESS",
    "CONFIG_DATA",
    "HOST_BRIDGE_CLASS",
    "HOST_BRIDGE_ID",
    "HOST_BRIDGE_SBDF",
    "PORTS",
    "PciConfigPorts",
]

CONFIG_ADDRESS: Final = 0xCF8
CONFIG_DATA: Final = 0xCFC
PORTS: Final = (0xCF8, 0xCFF)
"""The inclusive port range claimed."""
HOST_BRIDGE_SBDF: Final = (0, 0, 0, 0)
HOST_BRIDGE_ID: Final = (0x1234, 0x10E4)
"""Vendor and device id of the host bridge: the vendor id devmodel's function uses by default
(QEMU's test vendor), a device id of its own. Not an Intel id: Linux has quirks keyed on the
real i440FX's 8086:1237 that a bridge with nothing behind it should not trigger."""
HOST_BRIDGE_CLASS: Final = 0x060000
ENABLE: Final = 1 << 31

ConfigRead = Callable[[int, int], int]
"""(offset, size) -> value: a config read of the function."""
ConfigWrite = Callable[[int, int, int], None]
"""(offset, size, value): a config write of the function."""


def _ones(size: int) -> int:
    return (1 << (8 * size)) - 1


def _bridge_config() -> bytes:
    space = bytearray(256)
    space[0:2] = HOST_BRIDGE_ID[0].to_bytes(2, "little")
    space[2:4] = HOST_BRIDGE_ID[1].to_bytes(2, "little")
    # Revision 0, then prog-if, subclass, class: 0x060000 (host bridge). Header type 0.
    space[9:12] = HOST_BRIDGE_CLASS.to_bytes(3, "little")
    return bytes(space)


class PciConfigPorts:
    """Ports 0xcf8-0xcff and the host bridge for one PCI function at `sbdf` on bus 0."""

    def __init__(
        self,
        sbdf: tuple[int, int, int, int],
        config_read: ConfigRead,
        config_write: ConfigWrite,
    ) -> None:
        if sbdf[0] != 0 or sbdf[1] != 0:
            raise ValueError("the configuration ports reach segment 0, bus 0 only")
        if sbdf == HOST_BRIDGE_SBDF:
            raise ValueError("00:00.0 is the host bridge's")
        self.sbdf = sbdf
        self._read_function = config_read
        self._write_function = config_write
        self.address = 0
        """CONFIG_ADDRESS as the guest last wrote it."""
        self._bridge = _bridge_config()

    # --- what the server claims -----------------------------------------------------------

    @staticmethod
    def claims() -> tuple[tuple[int, int], tuple[int, int, int, int]]:
        """The port range (inclusive) and the host bridge's function to claim from Xen."""
        return PORTS, HOST_BRIDGE_SBDF

    @staticmethod
    def owns_port(port: int, size: int) -> bool:
        return PORTS[0] <= port and port + size - 1 <= PORTS[1]

    # --- port I/O --------------------------------------------------------------------------

    def port_read(self, port: int, size: int) -> int:
        """A read of `size` bytes at `port` (inside PORTS)."""
        if port == CONFIG_ADDRESS and size == 4:
            return self.address
        if port >= CONFIG_DATA and size in (1, 2, 4) and port + size - 1 <= PORTS[1]:
            target = self._target(port)
            if target is not None:
                return self.config_read(*target, size)
        return _ones(size)

    def port_write(self, port: int, size: int, value: int) -> None:
        """A write of `size` bytes at `port` (inside PORTS)."""
        if port == CONFIG_ADDRESS and size == 4:
            self.address = value & 0xFFFF_FFFF
            return
        if port >= CONFIG_DATA and size in (1, 2, 4) and port + size - 1 <= PORTS[1]:
            target = self._target(port)
            if target is not None:
                self.config_write(*target, size, value & _ones(size))

    def _target(self, port: int) -> tuple[tuple[int, int, int, int], int] | None:
        """The function and register the latched address selects for a data access."""
        a = self.address
        if not a & ENABLE:
            return None
        bus, devfn = (a >> 16) & 0xFF, (a >> 8) & 0xFF
        offset = (a & 0xFC) + (port - CONFIG_DATA)
        return (0, bus, devfn >> 3, devfn & 7), offset

    # --- config cycles (from the ports, or PCI_CONFIG requests from Xen) -------------------

    def serves(self, sbdf: tuple[int, int, int, int]) -> bool:
        """True for the functions this object answers config cycles of."""
        return sbdf in (self.sbdf, HOST_BRIDGE_SBDF)

    def config_read(self, sbdf: tuple[int, int, int, int], offset: int, size: int) -> int:
        if sbdf == self.sbdf:
            return self._read_function(offset, size)
        if sbdf == HOST_BRIDGE_SBDF and offset + size <= len(self._bridge):
            return int.from_bytes(self._bridge[offset : offset + size], "little")
        return _ones(size)  # nothing there: a master abort

    def config_write(
        self, sbdf: tuple[int, int, int, int], offset: int, size: int, value: int
    ) -> None:
        if sbdf == self.sbdf:
            self._write_function(offset, size, value)
        # The host bridge is read-only; other functions do not exist.
