"""A small ACPI encoder and parser, sans-IO: what a device model needs to describe its PCI root.

Why: a PVH guest has no QEMU and no hvmloader, and the tables libxl builds for it describe
processors only, so Linux (which with ACPI on takes its PCI root buses from the namespace)
scans no bus. devmodel adds a PCI root of its own: an SSDT holding one `PNP0A03` device with
its `_CRS`, a new XSDT (and RSDT) listing the old tables plus that SSDT, and the RSDP
rewritten to point at them (devmodel/xen/pvh_acpi.py does the guest side).

Layouts and encodings are the ACPI specification's (6.x: 5.2.5 RSDP, 5.2.6 table header,
5.2.7/5.2.8 RSDT/XSDT, 20.2 AML grammar, 6.4 resource descriptors). Everything here is plain
bytes in, bytes out; malformed input raises `AcpiError` (a ProtocolError), nothing else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from pyvfio_user.errors import ProtocolError

__all__ = [
    "HEADER_SIZE",
    "RSDP_SIGNATURE",
    "RSDP_V1_SIZE",
    "RSDP_V2_SIZE",
    "AcpiError",
    "MemoryWindow",
    "PciRoot",
    "Rsdp",
    "TableHeader",
    "checksum_ok",
    "decode_pkg_length",
    "eisa_id",
    "encode_rsdt",
    "encode_table",
    "encode_xsdt",
    "parse_root_table",
    "parse_rsdp",
    "parse_table_header",
    "pci_root_crs",
    "pci_root_ssdt",
    "pkg_length",
    "rewrite_rsdp",
]


class AcpiError(ProtocolError):
    """Bytes that are not the ACPI structure they should be (signature, length, checksum)."""


RSDP_SIGNATURE: Final = b"RSD PTR "
RSDP_V1_SIZE: Final = 20
"""The part the (first) checksum covers: ACPI 1.0's whole RSDP."""
RSDP_V2_SIZE: Final = 36
"""ACPI 2.0's RSDP, which the extended checksum covers."""
HEADER_SIZE: Final = 36
"""Every system description table's header."""

_HEADER: Final = struct.Struct("<4sIBB6s8sI4sI")
_RSDP_V1: Final = struct.Struct("<8sB6sBI")
_RSDP_V2_TAIL: Final = struct.Struct("<IQB3s")

OEM_ID: Final = b"DEVMDL"
OEM_TABLE_ID: Final = b"PVHPCI0 "
CREATOR_ID: Final = b"DVML"
CREATOR_REVISION: Final = 1


def _sum(data: bytes | bytearray | memoryview) -> int:
    return sum(data) & 0xFF


def checksum_ok(data: bytes | bytearray | memoryview) -> bool:
    """ACPI's rule for every checksummed structure: its bytes sum to 0 modulo 256."""
    return _sum(data) == 0


# --- table headers ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TableHeader:
    """The 36-byte header every table after the RSDP starts with."""

    signature: bytes
    length: int
    revision: int
    checksum: int
    oem_id: bytes
    oem_table_id: bytes
    oem_revision: int
    creator_id: bytes
    creator_revision: int


def parse_table_header(data: bytes | bytearray | memoryview) -> TableHeader:
    """The header at the start of `data` (only the header is looked at, not the checksum)."""
    if len(data) < HEADER_SIZE:
        raise AcpiError(f"a table header needs {HEADER_SIZE} bytes, got {len(data)}")
    fields = _HEADER.unpack_from(bytes(data[:HEADER_SIZE]))
    header = TableHeader(*fields)
    if header.length < HEADER_SIZE:
        raise AcpiError(f"table length {header.length} is shorter than its header")
    return header


def encode_table(
    signature: bytes,
    body: bytes,
    *,
    revision: int,
    oem_id: bytes = OEM_ID,
    oem_table_id: bytes = OEM_TABLE_ID,
    oem_revision: int = 1,
    creator_id: bytes = CREATOR_ID,
    creator_revision: int = CREATOR_REVISION,
) -> bytes:
    """A whole table: header (length and checksum filled in) followed by `body`."""
    if len(signature) != 4 or len(oem_id) != 6 or len(oem_table_id) != 8 or len(creator_id) != 4:
        raise ValueError("ACPI ids are 4, 6, 8 and 4 bytes")
    length = HEADER_SIZE + len(body)
    head = _HEADER.pack(
        signature,
        length,
        revision,
        0,
        oem_id,
        oem_table_id,
        oem_revision,
        creator_id,
        creator_revision,
    )
    table = bytearray(head + body)
    table[9] = (-_sum(table)) & 0xFF
    return bytes(table)


def parse_root_table(data: bytes | bytearray | memoryview, entry_size: int) -> list[int]:
    """The table addresses an RSDT (`entry_size` 4) or XSDT (8) lists; checks the checksum.

    `data` may run past the table (a mapped page); only the header's `length` bytes count.
    """
    if entry_size not in (4, 8):
        raise ValueError("RSDT entries are 4 bytes, XSDT entries 8")
    want = b"RSDT" if entry_size == 4 else b"XSDT"
    header = parse_table_header(data)
    if header.signature != want:
        raise AcpiError(f"expected {want.decode()}, found signature {header.signature!r}")
    if header.length > len(data):
        raise AcpiError(f"{want.decode()} length {header.length} runs past {len(data)} bytes")
    table = bytes(data[: header.length])
    if not checksum_ok(table):
        raise AcpiError(f"{want.decode()} checksum is wrong")
    if (header.length - HEADER_SIZE) % entry_size:
        raise AcpiError(f"{want.decode()} length {header.length} is not whole entries")
    fmt = "<I" if entry_size == 4 else "<Q"
    return [v for (v,) in struct.iter_unpack(fmt, table[HEADER_SIZE:])]


def _root_table(
    signature: bytes, fmt: str, addresses: list[int], like: TableHeader | None
) -> bytes:
    body = b"".join(struct.pack(fmt, a) for a in addresses)
    if like is None:
        return encode_table(signature, body, revision=1)
    return encode_table(
        signature,
        body,
        revision=like.revision,
        oem_id=like.oem_id,
        oem_table_id=like.oem_table_id,
        oem_revision=like.oem_revision,
        creator_id=like.creator_id,
        creator_revision=like.creator_revision,
    )


def encode_xsdt(addresses: list[int], like: TableHeader | None = None) -> bytes:
    """An XSDT listing `addresses`; ids and revision copied from `like` (the table replaced)."""
    if any(not 0 <= a < 1 << 64 for a in addresses):
        raise ValueError("XSDT entries are 64-bit addresses")
    return _root_table(b"XSDT", "<Q", addresses, like)


def encode_rsdt(addresses: list[int], like: TableHeader | None = None) -> bytes:
    """An RSDT listing `addresses` (all below 4 GiB)."""
    if any(not 0 <= a < 1 << 32 for a in addresses):
        raise ValueError("RSDT entries are 32-bit addresses")
    return _root_table(b"RSDT", "<I", addresses, like)


# --- the RSDP -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rsdp:
    """The Root System Description Pointer. `xsdt_address` and `length` are None for ACPI 1.0
    (revision 0), whose RSDP is the first 20 bytes only."""

    oem_id: bytes
    revision: int
    rsdt_address: int
    length: int | None = None
    xsdt_address: int | None = None

    @property
    def size(self) -> int:
        """How many bytes of guest memory it occupies (and a rewrite touches)."""
        return RSDP_V1_SIZE if self.revision < 2 else RSDP_V2_SIZE


def parse_rsdp(data: bytes | bytearray | memoryview) -> Rsdp:
    """The RSDP at the start of `data`, its signature and checksum(s) checked."""
    if len(data) < RSDP_V1_SIZE:
        raise AcpiError(f"an RSDP needs {RSDP_V1_SIZE} bytes, got {len(data)}")
    head = bytes(data[:RSDP_V1_SIZE])
    signature, _csum, oem_id, revision, rsdt = _RSDP_V1.unpack(head)
    if signature != RSDP_SIGNATURE:
        raise AcpiError(f"no RSDP signature: {signature!r}")
    if not checksum_ok(head):
        raise AcpiError("RSDP checksum (first 20 bytes) is wrong")
    if revision < 2:
        return Rsdp(oem_id, revision, rsdt)
    if len(data) < RSDP_V2_SIZE:
        raise AcpiError(f"a revision {revision} RSDP needs {RSDP_V2_SIZE} bytes")
    whole = bytes(data[:RSDP_V2_SIZE])
    length, xsdt, _ext, _reserved = _RSDP_V2_TAIL.unpack_from(whole, RSDP_V1_SIZE)
    if length < RSDP_V2_SIZE:
        raise AcpiError(f"RSDP length {length} is shorter than {RSDP_V2_SIZE}")
    if not checksum_ok(whole):
        raise AcpiError("RSDP extended checksum (36 bytes) is wrong")
    return Rsdp(oem_id, revision, rsdt, length, xsdt)


def rewrite_rsdp(
    data: bytes | bytearray | memoryview, *, rsdt_address: int, xsdt_address: int | None
) -> bytes:
    """The RSDP in `data` (checked as `parse_rsdp` does) with new root table addresses and
    both checksums recomputed. Returns its `Rsdp.size` bytes, to write back in place.

    `xsdt_address` must be None exactly when the RSDP is revision 0 (it has no XSDT field).
    """
    old = parse_rsdp(data)
    if (xsdt_address is None) != (old.revision < 2):
        raise ValueError("a revision 2 RSDP takes an XSDT address, a revision 0 one none")
    if not 0 <= rsdt_address < 1 << 32:
        raise ValueError("the RSDT address is 32-bit")
    out = bytearray(data[: old.size])
    struct.pack_into("<I", out, 16, rsdt_address)
    out[8] = 0
    out[8] = (-_sum(out[:RSDP_V1_SIZE])) & 0xFF
    if xsdt_address is not None:
        if not 0 <= xsdt_address < 1 << 64:
            raise ValueError("the XSDT address is 64-bit")
        struct.pack_into("<Q", out, 24, xsdt_address)
        out[32] = 0
        out[32] = (-_sum(out[:RSDP_V2_SIZE])) & 0xFF
    return bytes(out)


# --- AML ----------------------------------------------------------------------------------------
# The few opcodes a PCI root needs (ACPI 6.x section 20.2).

_ZERO_OP: Final = 0x00
_ONE_OP: Final = 0x01
_NAME_OP: Final = 0x08
_BYTE_PREFIX: Final = 0x0A
_WORD_PREFIX: Final = 0x0B
_DWORD_PREFIX: Final = 0x0C
_QWORD_PREFIX: Final = 0x0E
_SCOPE_OP: Final = 0x10
_BUFFER_OP: Final = 0x11
_EXT_OP_PREFIX: Final = 0x5B
_DEVICE_OP: Final = 0x82  # after ExtOpPrefix
_ROOT_CHAR: Final = 0x5C  # '\'

_PKG_LENGTH_MAX: Final = (1 << 28) - 1


def pkg_length(content: int) -> bytes:
    """The PkgLength for `content` bytes following it. The encoded value counts its own
    bytes too, so the shortest form that fits is chosen with that in mind: one byte holds up
    to 63 in its low 6 bits; longer forms put the byte count (1-3) in bits 6-7 of the lead
    byte, its low nibble in bits 0-3, and the rest 8 bits at a time."""
    if content < 0:
        raise ValueError("negative length")
    for extra in range(4):
        total = content + 1 + extra
        if extra == 0 and total <= 0x3F:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0x0F)]
            rest = total >> 4
            for _ in range(extra):
                out.append(rest & 0xFF)
                rest >>= 8
            return bytes(out)
    raise ValueError(f"{content} bytes is more than a PkgLength can say ({_PKG_LENGTH_MAX})")


def decode_pkg_length(data: bytes, at: int = 0) -> tuple[int, int]:
    """(the value, how many bytes it took) of the PkgLength at `data[at]`."""
    if at >= len(data):
        raise AcpiError("PkgLength past the end")
    lead = data[at]
    extra = lead >> 6
    if extra == 0:
        return lead & 0x3F, 1
    if at + extra >= len(data):
        raise AcpiError("PkgLength past the end")
    value = lead & 0x0F
    for i in range(extra):
        value |= data[at + 1 + i] << (4 + 8 * i)
    return value, 1 + extra


def _name_seg(name: str) -> bytes:
    """A 4-character NameSeg, padded with '_' as ASL does (`PCI0`, `_HID`, `_SB_`)."""
    seg = name.ljust(4, "_").encode("ascii")
    if len(seg) != 4 or not (seg[:1].isupper() or seg[:1] == b"_"):
        raise ValueError(f"bad ACPI name {name!r}")
    return seg


def _integer(value: int) -> bytes:
    """The smallest AML integer encoding of `value`."""
    if value == 0:
        return bytes([_ZERO_OP])
    if value == 1:
        return bytes([_ONE_OP])
    for prefix, fmt, limit in (
        (_BYTE_PREFIX, "<B", 1 << 8),
        (_WORD_PREFIX, "<H", 1 << 16),
        (_DWORD_PREFIX, "<I", 1 << 32),
        (_QWORD_PREFIX, "<Q", 1 << 64),
    ):
        if 0 <= value < limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    raise ValueError(f"{value} is no AML integer")


def eisa_id(text: str) -> int:
    """ASL's EisaId(): three letters (5 bits each, 'A' = 1) and four hex digits, stored so
    that the DWORD's bytes read in order are the compressed id, big-endian."""
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise ValueError(f"bad EISA id {text!r}")
    letters = [ord(c) - 0x40 for c in text[:3]]
    compressed = (letters[0] << 10) | (letters[1] << 5) | letters[2]
    product = int(text[3:], 16)
    return int.from_bytes(struct.pack(">HH", compressed, product), "little")


def _name(name: str, value: bytes) -> bytes:
    return bytes([_NAME_OP]) + _name_seg(name) + value


def _buffer(data: bytes) -> bytes:
    inner = _integer(len(data)) + data
    return bytes([_BUFFER_OP]) + pkg_length(len(inner)) + inner


def _device(name: str, body: bytes) -> bytes:
    inner = _name_seg(name) + body
    return bytes([_EXT_OP_PREFIX, _DEVICE_OP]) + pkg_length(len(inner)) + inner


def _scope(path: bytes, body: bytes) -> bytes:
    inner = path + body
    return bytes([_SCOPE_OP]) + pkg_length(len(inner)) + inner


# --- resource descriptors (ACPI 6.x section 6.4) -----------------------------------------------

_RES_TYPE_MEMORY: Final = 0
_RES_TYPE_BUS: Final = 2
_GEN_MIN_FIXED: Final = 1 << 2
_GEN_MAX_FIXED: Final = 1 << 3
_GEN_CONSUMER: Final = 1 << 0
_MEM_READ_WRITE: Final = 1 << 0
_MEM_CACHEABLE: Final = 1 << 1
_MEM_PREFETCHABLE: Final = 3 << 1


@dataclass(frozen=True, slots=True)
class MemoryWindow:
    """An address range the root bus decodes for its devices' BARs: [base, base + size)."""

    base: int
    size: int
    prefetchable: bool = False

    @property
    def end(self) -> int:
        """The last byte (inclusive, as _CRS says it)."""
        return self.base + self.size - 1


@dataclass(frozen=True, slots=True)
class PciRoot:
    """One PCI root bridge as the guest's firmware would describe it."""

    name: str = "PCI0"
    segment: int = 0
    bus: int = 0
    config_ports: bool = True
    """List ports 0xcf8-0xcff as the bridge's own (consumed), as QEMU's DSDT does."""
    windows: tuple[MemoryWindow, ...] = ()


def _word_bus_number(first: int, last: int) -> bytes:
    body = struct.pack(
        "<BBBHHHHH",
        _RES_TYPE_BUS,
        _GEN_MIN_FIXED | _GEN_MAX_FIXED,  # producer, positive decode
        0,
        0,  # granularity
        first,
        last,
        0,  # translation
        last - first + 1,
    )
    return bytes([0x88]) + struct.pack("<H", len(body)) + body


def _io_ports(first: int, length: int) -> bytes:
    # Small item 0x08 (I/O port), length 7: 16-bit decode, min = max, alignment 1.
    return bytes([0x47, 0x01]) + struct.pack("<HHBB", first, first, 1, length)


def _memory(window: MemoryWindow) -> bytes:
    # As QEMU's DSDT: the 32-bit window non-cacheable, a 64-bit one cacheable, and either
    # prefetchable when asked (Linux places prefetchable 64-bit BARs there first).
    if window.prefetchable:
        attr = _MEM_PREFETCHABLE
    else:
        attr = _MEM_CACHEABLE if window.end >= 1 << 32 else 0
    flags = (_RES_TYPE_MEMORY, _GEN_MIN_FIXED | _GEN_MAX_FIXED, _MEM_READ_WRITE | attr)
    if window.end < 1 << 32:
        body = struct.pack("<BBBIIIII", *flags, 0, window.base, window.end, 0, window.size)
        return bytes([0x87]) + struct.pack("<H", len(body)) + body
    body = struct.pack("<BBBQQQQQ", *flags, 0, window.base, window.end, 0, window.size)
    return bytes([0x8A]) + struct.pack("<H", len(body)) + body


def pci_root_crs(root: PciRoot) -> bytes:
    """The root's _CRS resource template: bus range, config ports, windows, end tag."""
    out = _word_bus_number(root.bus, root.bus)
    if root.config_ports:
        out += _io_ports(0xCF8, 8)
    for w in root.windows:
        if w.size <= 0 or w.base < 0 or w.end >= 1 << 64:
            raise ValueError(f"bad window {w}")
        out += _memory(w)
    out += b"\x79"  # End tag; its checksum makes the whole template sum to 0.
    return out + bytes([(-_sum(out)) & 0xFF])


def pci_root_ssdt(root: PciRoot, *, oem_table_id: bytes = OEM_TABLE_ID) -> bytes:
    """An SSDT: Scope(\\_SB) { Device(<name>) { _HID PNP0A03, _UID, _SEG, _BBN, _CRS } }.

    Revision 2: integers are 64-bit, which the 64-bit window's QWord values need."""
    body = (
        _name("_HID", bytes([_DWORD_PREFIX]) + struct.pack("<I", eisa_id("PNP0A03")))
        + _name("_UID", _integer(0))
        + _name("_SEG", _integer(root.segment))
        + _name("_BBN", _integer(root.bus))
        + _name("_CRS", _buffer(pci_root_crs(root)))
    )
    aml = _scope(bytes([_ROOT_CHAR]) + _name_seg("_SB"), _device(root.name, body))
    return encode_table(b"SSDT", aml, revision=2, oem_table_id=oem_table_id)
