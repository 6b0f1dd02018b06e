"""Conventional (256-byte) type 0 configuration space of the lent-memory function.

Every register is one row of `ConfigSpace.fields`: its power-on value, the bits software may
write, and the bits it clears by writing 1 (RW1C). The image, the write mask and the RW1C mask
are built from that table alone, so "which bits are read-only" has one answer and the
property test can check the whole space against it. Bytes no row covers read 0 and ignore
writes (reserved space, absent BARs, the expansion ROM, the end of the capability area).

BAR sizing falls out of the write masks: a BAR's writable bits are the address bits above its
size, and its type bits are read-only, so writing all-ones reads back the size mask with the
type bits, exactly as the PCI spec requires, with no special case in the write path.

Capabilities (all a vfio client needs to emulate interrupts itself; QEMU does):
MSI at 0x40 (64-bit address, one vector, no per-vector masking), MSI-X at 0x50 (table and PBA
in BAR2). No PCI Express capability: QEMU treats a 256-byte config region as conventional PCI.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass

from devmodel.pci.errors import AccessError
from devmodel.pci.identity import PciIdentity

CONFIG_SPACE_SIZE = 256

# Header offsets (PCI Local Bus 3.0, type 0 header).
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_CODE = 0x09
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BIST = 0x0F
BAR_BASE = 0x10
NUM_BARS = 6
CARDBUS_CIS = 0x28
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
EXPANSION_ROM = 0x30
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
MIN_GNT = 0x3E
MAX_LAT = 0x3F

# Capability structures.
CAP_ID_MSI = 0x05
CAP_ID_MSIX = 0x11
MSI_CAP = 0x40
MSIX_CAP = 0x50
MSI_CONTROL = MSI_CAP + 2
MSI_ADDRESS_LO = MSI_CAP + 4
MSI_ADDRESS_HI = MSI_CAP + 8
MSI_DATA = MSI_CAP + 12
MSIX_CONTROL = MSIX_CAP + 2
MSIX_TABLE = MSIX_CAP + 4
MSIX_PBA = MSIX_CAP + 8

# Command register bits the function implements; every other bit is read-only 0 (no I/O BARs,
# no parity or SERR reporting, no special cycles).
CMD_MEMORY = 1 << 1
CMD_BUS_MASTER = 1 << 2
CMD_INTX_DISABLE = 1 << 10
COMMAND_WRITABLE = CMD_MEMORY | CMD_BUS_MASTER | CMD_INTX_DISABLE

# Status register.
STS_INTERRUPT = 1 << 3  # read-only, driven by the device
STS_CAP_LIST = 1 << 4
STS_MASTER_DATA_PARITY = 1 << 8
STS_SIGNALED_TARGET_ABORT = 1 << 11
STS_RECEIVED_TARGET_ABORT = 1 << 12
STS_RECEIVED_MASTER_ABORT = 1 << 13
STS_SIGNALED_SYSTEM_ERROR = 1 << 14
STS_DETECTED_PARITY_ERROR = 1 << 15
STATUS_RW1C = (
    STS_MASTER_DATA_PARITY
    | STS_SIGNALED_TARGET_ABORT
    | STS_RECEIVED_TARGET_ABORT
    | STS_RECEIVED_MASTER_ABORT
    | STS_SIGNALED_SYSTEM_ERROR
    | STS_DETECTED_PARITY_ERROR
)
# Bits the device itself may set; software can only clear the RW1C ones.
STATUS_DEVICE_BITS = STATUS_RW1C | STS_INTERRUPT

# BAR type bits (low nibble of a memory BAR).
BAR_MEM_64 = 0b100
BAR_PREFETCH = 0b1000
BAR_TYPE_MASK = 0xF

MSI_CTL_ENABLE = 1 << 0
MSI_CTL_64BIT = 1 << 7
MSIX_CTL_FUNCTION_MASK = 1 << 14
MSIX_CTL_ENABLE = 1 << 15

INTX_PIN_A = 1
HEADER_TYPE_0 = 0x00


@dataclass(frozen=True, slots=True)
class BarSpec:
    """One implemented memory BAR as config space must advertise it."""

    number: int
    size: int
    is_64bit: bool
    prefetchable: bool

    def __post_init__(self) -> None:
        # Memory BARs are at least 16 bytes (the type nibble) and a power of two.
        if self.size < 16 or self.size & (self.size - 1):
            raise ValueError(f"BAR{self.number} size must be a power of two >= 16")
        if not 0 <= self.number < NUM_BARS - (1 if self.is_64bit else 0):
            raise ValueError(f"BAR{self.number} does not fit in the header")
        if self.is_64bit and self.number % 2:
            raise ValueError("a 64-bit BAR must start at an even BAR number")

    @property
    def type_bits(self) -> int:
        return (BAR_MEM_64 if self.is_64bit else 0) | (BAR_PREFETCH if self.prefetchable else 0)


@dataclass(frozen=True, slots=True)
class ConfigField:
    """One register: where, power-on value, writable bits, write-1-to-clear bits."""

    name: str
    offset: int
    width: int
    reset: int
    wmask: int = 0
    w1c: int = 0
    description: str = ""


@dataclass(frozen=True, slots=True)
class MsixLayout:
    """Where the MSI-X table and PBA live; config space advertises it, BAR2 implements it."""

    vectors: int
    bar: int
    table_offset: int
    pba_offset: int


def config_layout(
    identity: PciIdentity, bars: Sequence[BarSpec], msix: MsixLayout
) -> tuple[ConfigField, ...]:
    """The whole register table of config space for this identity, BAR set and MSI-X layout."""
    fields = [
        ConfigField("VENDOR_ID", VENDOR_ID, 2, identity.vendor_id),
        ConfigField("DEVICE_ID", DEVICE_ID, 2, identity.device_id),
        ConfigField(
            "COMMAND", COMMAND, 2, 0, COMMAND_WRITABLE,
            description="memory space, bus master, INTx disable",
        ),
        ConfigField(
            "STATUS", STATUS, 2, STS_CAP_LIST, 0, STATUS_RW1C,
            description="capability list; error bits RW1C; interrupt status",
        ),
        ConfigField("REVISION_ID", REVISION_ID, 1, identity.revision),
        ConfigField("CLASS_CODE", CLASS_CODE, 3, identity.class_code),
        ConfigField("CACHE_LINE_SIZE", CACHE_LINE_SIZE, 1, 0, 0xFF),
        ConfigField("LATENCY_TIMER", LATENCY_TIMER, 1, 0, 0xFF),
        ConfigField("HEADER_TYPE", HEADER_TYPE, 1, HEADER_TYPE_0, description="single function"),
        ConfigField("BIST", BIST, 1, 0, description="no built-in self test"),
    ]
    taken: set[int] = set()
    for bar in bars:
        reg = BAR_BASE + 4 * bar.number
        address_mask = ~(bar.size - 1)
        fields.append(
            ConfigField(
                f"BAR{bar.number}", reg, 4, bar.type_bits, address_mask & 0xFFFFFFF0,
                description=f"{bar.size:#x} bytes, {'64' if bar.is_64bit else '32'}-bit"
                f"{', prefetchable' if bar.prefetchable else ''}",
            )
        )
        taken.add(bar.number)
        if bar.is_64bit:
            fields.append(
                ConfigField(
                    f"BAR{bar.number + 1}", reg + 4, 4, 0, (address_mask >> 32) & 0xFFFFFFFF,
                    description=f"upper half of BAR{bar.number}",
                )
            )
            taken.add(bar.number + 1)
    fields += [
        ConfigField(f"BAR{n}", BAR_BASE + 4 * n, 4, 0, description="not implemented")
        for n in range(NUM_BARS)
        if n not in taken
    ]
    fields += [
        ConfigField("CARDBUS_CIS", CARDBUS_CIS, 4, 0),
        ConfigField("SUBSYSTEM_VENDOR_ID", SUBSYSTEM_VENDOR_ID, 2, identity.subsystem_vendor_id),
        ConfigField("SUBSYSTEM_ID", SUBSYSTEM_ID, 2, identity.subsystem_id),
        ConfigField("EXPANSION_ROM", EXPANSION_ROM, 4, 0, description="no ROM: sizing reads 0"),
        ConfigField("CAPABILITIES_POINTER", CAPABILITIES_POINTER, 1, MSI_CAP),
        ConfigField("INTERRUPT_LINE", INTERRUPT_LINE, 1, 0, 0xFF, description="for software"),
        ConfigField("INTERRUPT_PIN", INTERRUPT_PIN, 1, INTX_PIN_A, description="INTA#"),
        ConfigField("MIN_GNT", MIN_GNT, 1, 0),
        ConfigField("MAX_LAT", MAX_LAT, 1, 0),
        ConfigField("MSI_CAP_ID", MSI_CAP, 1, CAP_ID_MSI),
        ConfigField("MSI_NEXT", MSI_CAP + 1, 1, MSIX_CAP),
        ConfigField(
            "MSI_CONTROL", MSI_CONTROL, 2, MSI_CTL_64BIT, MSI_CTL_ENABLE,
            description="64-bit, 1 vector (multiple message enable read-only 0), no masking",
        ),
        ConfigField("MSI_ADDRESS_LO", MSI_ADDRESS_LO, 4, 0, 0xFFFFFFFC),
        ConfigField("MSI_ADDRESS_HI", MSI_ADDRESS_HI, 4, 0, 0xFFFFFFFF),
        ConfigField("MSI_DATA", MSI_DATA, 2, 0, 0xFFFF),
        ConfigField("MSIX_CAP_ID", MSIX_CAP, 1, CAP_ID_MSIX),
        ConfigField("MSIX_NEXT", MSIX_CAP + 1, 1, 0, description="end of list"),
        ConfigField(
            "MSIX_CONTROL", MSIX_CONTROL, 2, msix.vectors - 1,
            MSIX_CTL_ENABLE | MSIX_CTL_FUNCTION_MASK,
            description=f"{msix.vectors} vectors; enable and function mask writable",
        ),
        ConfigField("MSIX_TABLE", MSIX_TABLE, 4, msix.table_offset | msix.bar,
                    description=f"table at BAR{msix.bar} + {msix.table_offset:#x}"),
        ConfigField("MSIX_PBA", MSIX_PBA, 4, msix.pba_offset | msix.bar,
                    description=f"PBA at BAR{msix.bar} + {msix.pba_offset:#x}"),
    ]
    return tuple(sorted(fields, key=lambda f: f.offset))


class ConfigSpace:
    """The live 256 bytes: an image plus the two masks the field table produces.

    Not on any hot path (QEMU emulates most config reads itself), so writes go byte by byte
    through the masks; that keeps partial and unaligned writes of any length correct for free.
    """

    __slots__ = ("_bars", "_image", "_reset_image", "_w1c", "_wmask", "fields", "msix")

    def __init__(
        self, identity: PciIdentity, bars: Sequence[BarSpec], msix: MsixLayout
    ) -> None:
        self.fields = config_layout(identity, bars, msix)
        self.msix = msix
        self._bars = {bar.number: bar for bar in bars}
        image = bytearray(CONFIG_SPACE_SIZE)
        wmask = bytearray(CONFIG_SPACE_SIZE)
        w1c = bytearray(CONFIG_SPACE_SIZE)
        covered = bytearray(CONFIG_SPACE_SIZE)
        for field in self.fields:
            end = field.offset + field.width
            if any(covered[field.offset : end]):
                raise ValueError(f"config field {field.name} overlaps another")
            covered[field.offset : end] = b"\x01" * field.width
            image[field.offset : end] = field.reset.to_bytes(field.width, "little")
            wmask[field.offset : end] = field.wmask.to_bytes(field.width, "little")
            w1c[field.offset : end] = field.w1c.to_bytes(field.width, "little")
        self._reset_image = bytes(image)
        self._image = image
        self._wmask = bytes(wmask)
        self._w1c = bytes(w1c)

    @staticmethod
    def _check(offset: int, size: int) -> None:
        # Offset 256 is outside even for an empty access; an empty one inside reads b"".
        if size < 0 or not 0 <= offset < CONFIG_SPACE_SIZE or offset + size > CONFIG_SPACE_SIZE:
            raise AccessError(
                errno.EFAULT,
                f"config access of {size} bytes at {offset:#x} is outside the "
                f"{CONFIG_SPACE_SIZE}-byte config space",
            )

    def read(self, offset: int, size: int) -> bytes:
        """Any offset and length inside the 256 bytes: QEMU reads them all at once."""
        self._check(offset, size)
        return bytes(self._image[offset : offset + size])

    def write(self, offset: int, data: bytes) -> None:
        """Apply a write through the masks; read-only bits keep their value, never an error."""
        self._check(offset, len(data))
        image, wmask, w1c = self._image, self._wmask, self._w1c
        for i, value in enumerate(data):
            at = offset + i
            writable = wmask[at]
            image[at] = ((image[at] & ~writable) | (value & writable)) & ~(value & w1c[at])

    def reset(self) -> None:
        """Power-on values: BAR addresses 0, command 0, MSI/MSI-X disabled, status clean."""
        self._image[:] = self._reset_image

    def u8(self, offset: int) -> int:
        return self._image[offset]

    def u16(self, offset: int) -> int:
        return int.from_bytes(self._image[offset : offset + 2], "little")

    def u32(self, offset: int) -> int:
        return int.from_bytes(self._image[offset : offset + 4], "little")

    def _set16(self, offset: int, value: int) -> None:
        self._image[offset : offset + 2] = value.to_bytes(2, "little")

    def set_status(self, bits: int) -> None:
        """The device raises status bits (errors it signalled, its interrupt line)."""
        if bits & ~STATUS_DEVICE_BITS:
            raise ValueError(f"status bits {bits:#x} are not device-controlled")
        self._set16(STATUS, self.u16(STATUS) | bits)

    def clear_status(self, bits: int) -> None:
        """The device drops status bits it drives itself (the interrupt status)."""
        if bits & ~STATUS_DEVICE_BITS:
            raise ValueError(f"status bits {bits:#x} are not device-controlled")
        self._set16(STATUS, self.u16(STATUS) & ~bits)

    @property
    def command(self) -> int:
        return self.u16(COMMAND)

    @property
    def memory_enabled(self) -> bool:
        return bool(self.u16(COMMAND) & CMD_MEMORY)

    @property
    def bus_master_enabled(self) -> bool:
        return bool(self.u16(COMMAND) & CMD_BUS_MASTER)

    @property
    def intx_disabled(self) -> bool:
        return bool(self.u16(COMMAND) & CMD_INTX_DISABLE)

    @property
    def msi_enabled(self) -> bool:
        return bool(self.u16(MSI_CONTROL) & MSI_CTL_ENABLE)

    @property
    def msix_enabled(self) -> bool:
        return bool(self.u16(MSIX_CONTROL) & MSIX_CTL_ENABLE)

    @property
    def msix_function_masked(self) -> bool:
        return bool(self.u16(MSIX_CONTROL) & MSIX_CTL_FUNCTION_MASK)

    def msi_message(self) -> tuple[int, int]:
        """(address, data) the guest programmed, for transports that inject MSIs (Xen)."""
        address = self.u32(MSI_ADDRESS_LO) | self.u32(MSI_ADDRESS_HI) << 32
        return address, self.u16(MSI_DATA)

    def bar_programmed(self, bar: int) -> int | None:
        """The address in an implemented BAR's register(s) regardless of decoding, else None."""
        spec = self._bars.get(bar)
        if spec is None:
            return None
        reg = BAR_BASE + 4 * bar
        address = self.u32(reg) & ~BAR_TYPE_MASK
        if spec.is_64bit:
            address |= self.u32(reg + 4) << 32
        return address

    def bar_address(self, bar: int) -> int | None:
        """Where the BAR decodes: None if it is absent or memory decoding is off.

        Transports that route by address (Xen) claim a range only while this is not None; a
        guest sizing a BAR turns decoding off first, so the all-ones sizing value never shows.
        """
        if not self.u16(COMMAND) & CMD_MEMORY:
            return None
        return self.bar_programmed(bar)
