"""Who the PCI function says it is: the read-only identification registers of config space.

Kept as a frozen value so the command line, the toolstack and tests can build one, compare
them, and hand the same identity to every transport.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# 0xFFFF is what a read from an absent function returns: a vendor ID that can never be valid.
_NO_VENDOR = 0xFFFF
_PCI_ID = re.compile(r"([0-9a-fA-F]{4}):([0-9a-fA-F]{4})")


@dataclass(frozen=True, slots=True)
class PciIdentity:
    """Identification of the emulated function.

    The defaults use QEMU's test vendor (0x1234), which no shipping driver binds to: the guest
    must not load some unrelated driver for a RAM-class device.
    """

    vendor_id: int = 0x1234
    device_id: int = 0x10E5
    subsystem_vendor_id: int = 0x1234
    subsystem_id: int = 0x10E5
    # Memory controller / RAM: 24-bit class | subclass | prog-if.
    class_code: int = 0x050000
    revision: int = 1

    def __post_init__(self) -> None:
        for name, value, bits in (
            ("vendor_id", self.vendor_id, 16),
            ("device_id", self.device_id, 16),
            ("subsystem_vendor_id", self.subsystem_vendor_id, 16),
            ("subsystem_id", self.subsystem_id, 16),
            ("class_code", self.class_code, 24),
            ("revision", self.revision, 8),
        ):
            if not 0 <= value < 1 << bits:
                raise ValueError(f"{name} must fit in {bits} bits, not {value:#x}")
        if self.vendor_id == _NO_VENDOR:
            raise ValueError("vendor_id 0xffff means 'no device' and cannot be used")


def parse_pci_id(text: str) -> tuple[int, int]:
    """Parse "VVVV:DDDD" (hex, as lspci prints it) into (vendor, device)."""
    match = _PCI_ID.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"PCI ID must be VVVV:DDDD with four hex digits each (e.g. 1234:10e5), not {text!r}"
        )
    vendor, device = int(match[1], 16), int(match[2], 16)
    if vendor == _NO_VENDOR:
        raise ValueError("vendor ID ffff means 'no device' and cannot be used")
    return vendor, device
