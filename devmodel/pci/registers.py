"""BAR2: the register block a guest (or a test) reads to identify the device and watch it work.

The layout is the one table `REGISTERS`; `render_markdown` turns it into the documentation, so
the two cannot drift. Rules for the whole BAR (4 KiB, 32-bit, non-prefetchable):

- Accesses are 1, 2, 4 or 8 bytes, naturally aligned (AccessError EINVAL otherwise) and inside
  the BAR (EFAULT otherwise). An 8-byte access may span two 4-byte registers; a 4-byte access
  to either half of a 64-bit register returns that half.
- Offsets no row covers read 0 and ignore writes.
- Writes to read-only registers are ignored and *not* counted as bad accesses: per PCI custom a
  read-only register silently drops writes, and `bad_accesses` counts shape errors only (size,
  alignment, range), so it stays a signal of a broken or hostile client rather than noise.
- Counters are the live `DeviceCounters` values, wrapped to 64 bits. Reading a 64-bit counter
  as two 4-byte halves is not atomic against a concurrent increment; read it with one 8-byte
  access, or read high-low-high.
- Interrupts: writing a vector number to DOORBELL raises that interrupt through whatever the
  guest's driver enabled (PciFunction.raise_interrupt: MSI-X, else MSI, else INTx); INTERRUPTS
  counts them. INTx is level: the doorbell asserts INTA# (IRQ_STATUS bit 0, and the Interrupt
  Status bit of the config status register) and it stays asserted until software writes 1 to
  IRQ_STATUS bit 0. MSI and MSI-X are messages and need no acknowledgement.
- The MSI-X table and PBA live here too. The table is plain storage with the spec's masks
  (entries power on masked); the PBA reflects the pending bits of the MSI-X IRQ index, which is
  what QEMU's vfio-user client reads from the server.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import IntFlag, StrEnum
from operator import attrgetter

from devmodel.counters import DeviceCounters
from devmodel.pci.errors import AccessError

REGISTER_BAR_SIZE = 0x1000
MAGIC = int.from_bytes(b"DMDL", "little")
INTERFACE_VERSION = 1

MSIX_VECTORS = 4
MSIX_ENTRY_SIZE = 16
MSIX_TABLE_OFFSET = 0x800
MSIX_PBA_OFFSET = 0xC00
MSIX_PBA_SIZE = 8 * ((MSIX_VECTORS + 63) // 64)
MSIX_CTRL_MASKED = 1
# Writable bits of one table entry: address (dword aligned), upper address, data, mask bit.
_MSIX_ENTRY_WMASK = b"".join(
    v.to_bytes(4, "little") for v in (0xFFFFFFFC, 0xFFFFFFFF, 0xFFFFFFFF, MSIX_CTRL_MASKED)
)
_MSIX_ENTRY_RESET = bytes(12) + MSIX_CTRL_MASKED.to_bytes(4, "little")

VALID_SIZES = frozenset((1, 2, 4, 8))


class Feature(IntFlag):
    """Bits of the FEATURES register: what a guest-side tool may rely on."""

    MSI = 1 << 0  # MSI capability present
    MSIX = 1 << 1  # MSI-X capability present (table and PBA in this BAR)
    LENT = 1 << 2  # BAR0 is backed by a lender: an access may wait for a page-in
    DIRECT = 1 << 3  # resident windows are mapped straight into the guest (Xen fast path)


class RegAccess(StrEnum):
    RO = "RO"
    RW = "RW"
    WO = "WO"  # a command: writing acts, reading returns 0
    RW1C = "RW1C"  # status bits: writing 1 clears a bit, writing 0 leaves it


@dataclass(frozen=True, slots=True)
class Register:
    name: str
    offset: int
    width: int
    access: RegAccess
    description: str


RO, RW, WO, RW1C = RegAccess.RO, RegAccess.RW, RegAccess.WO, RegAccess.RW1C
IRQ_STATUS_INTX = 1 << 0
"""IRQ_STATUS bit 0: the device asserts INTA#."""

REGISTERS: tuple[Register, ...] = (
    Register("MAGIC", 0x00, 4, RO, 'ASCII "DMDL" as a little-endian u32 (0x4c444d44)'),
    Register("VERSION", 0x04, 4, RO, "register interface version; changes only incompatibly"),
    Register("APERTURE_SIZE", 0x08, 8, RO, "BAR0 size in bytes"),
    Register("GRANULE", 0x10, 4, RO, "lease granule in bytes: the unit of lending and revoking"),
    Register("FEATURES", 0x14, 4, RO, "feature bits (MSI 0, MSIX 1, LENT 2, DIRECT 3)"),
    Register("SCRATCH", 0x18, 4, RW, "free for software (tests); 0 after reset"),
    Register("TRAPPED_READS", 0x20, 8, RO, "BAR0 reads served by the device model"),
    Register("TRAPPED_WRITES", 0x28, 8, RO, "BAR0 writes served by the device model"),
    Register("BAD_ACCESSES", 0x30, 8, RO, "accesses refused for size, alignment or range"),
    Register("PROTOCOL_ERRORS", 0x38, 8, RO, "malformed or unsupported transport messages"),
    Register("PAGE_INS", 0x40, 8, RO, "lent pages brought back in by the lender"),
    Register("FAILED_ACCESSES", 0x48, 8, RO, "accesses answered by the failure policy"),
    Register("RESETS", 0x50, 8, RO, "device resets (DEVICE_RESET / FLR)"),
    Register("CLIENT_CONNECTS", 0x58, 8, RO, "transport clients that attached"),
    Register("GRANTS", 0x60, 8, RO, "leases the lender granted and the device accepted"),
    Register("GRANT_NACKS", 0x68, 8, RO, "grants refused (bad range, fd, protection ...)"),
    Register("REVOKES", 0x70, 8, RO, "leases revoked by the lender"),
    Register("FAULTS", 0x78, 8, RO, "accesses that waited for a revoke or a page-in"),
    Register("LENDER_LOSSES", 0x80, 8, RO, "times the lender connection was lost"),
    Register("POLL_HITS", 0x88, 8, RO, "transport socket polls that caught a message"),
    Register("POLL_MISSES", 0x90, 8, RO, "transport socket polls that ran out of budget"),
    Register("POLL_NS", 0x98, 8, RO, "CPU time spent polling the transport socket, in ns"),
    Register(
        "INTERRUPTS", 0xA0, 8, RO,
        "interrupts raised: MSI/MSI-X messages signalled or left pending, INTx assertions",
    ),
    Register(
        "DOORBELL", 0xA8, 4, WO,
        "write a vector: raise it (MSI-X vector 0-3 if MSI-X is on, else MSI or INTx, "
        "vector 0); other vectors are ignored",
    ),
    Register(
        "IRQ_STATUS", 0xAC, 4, RW1C,
        "bit 0: INTx asserted (by the doorbell); write 1 to deassert it",
    ),
    Register(
        "PAGE_IN_POLL_HITS", 0xB0, 8, RO, "page-in waits whose GRANT a lender-socket poll caught"
    ),
    Register("PAGE_IN_POLL_MISSES", 0xB8, 8, RO, "page-in waits that ran out of polling budget"),
    Register("PAGE_IN_POLL_NS", 0xC0, 8, RO, "CPU time spent polling the lender socket, in ns"),
    Register(
        "MSIX_TABLE", MSIX_TABLE_OFFSET, MSIX_ENTRY_SIZE * MSIX_VECTORS, RW,
        f"MSI-X table, {MSIX_VECTORS} entries of 16 bytes (address, upper address, data, "
        "vector control)",
    ),
    Register("MSIX_PBA", MSIX_PBA_OFFSET, MSIX_PBA_SIZE, RO, "MSI-X pending bit array"),
)
REGISTER_BY_NAME = {reg.name: reg for reg in REGISTERS}
# The 64-bit counters shown here, by register name: every DeviceCounters field must have one.
COUNTER_REGISTERS = {f.name.upper(): f.name for f in fields(DeviceCounters)}
# The scalar registers all sit below this offset; the rest of the BAR is tables or zeros.
_SCALAR_END = max(r.offset + r.width for r in REGISTERS if r.offset < MSIX_TABLE_OFFSET)


def render_markdown() -> str:
    """The register layout as a Markdown table, for docs/ and `--help-registers`."""
    lines = [
        f"BAR2: {REGISTER_BAR_SIZE:#x} bytes, 32-bit, non-prefetchable. Little-endian.",
        "Unlisted offsets read 0 and ignore writes.",
        "",
        "| offset | width | access | name | description |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.offset:#05x} | {r.width} | {r.access} | {r.name} | {r.description} |"
        for r in REGISTERS
    ]
    return "\n".join(lines) + "\n"


def shape_error(offset: int, size: int, region_size: int, what: str) -> AccessError | None:
    """The AccessError a BAR access deserves, or None: EINVAL for shape, EFAULT for range.

    Size and alignment are checked first, so a naturally aligned access (which can never
    straddle the end of a power-of-two BAR) is either inside or wholly outside: EFAULT means
    "well formed, wrong place".
    """
    if size not in VALID_SIZES:
        return AccessError(errno.EINVAL, f"{what}: {size}-byte access (1, 2, 4 or 8 only)")
    if offset & (size - 1):
        return AccessError(errno.EINVAL, f"{what}: {size}-byte access at {offset:#x} unaligned")
    if not 0 <= offset <= region_size - size:
        return AccessError(
            errno.EFAULT, f"{what}: access at {offset:#x} outside the {region_size:#x}-byte BAR"
        )
    return None


class RegisterBlock:
    """The live contents of BAR2."""

    __slots__ = (
        "_actions",
        "_blocks",
        "_getters",
        "_msix_table",
        "_pending_msix",
        "_rw",
        "_rw_mask",
    )

    def __init__(
        self,
        aperture_size: int,
        granule: int,
        features: Feature,
        counters: DeviceCounters,
        pending_msix: Callable[[], int],
        *,
        doorbell: Callable[[int], object] = lambda vector: None,
        irq_status: Callable[[], int] = lambda: 0,
        irq_ack: Callable[[int], object] = lambda bits: None,
    ) -> None:
        constants: dict[str, int] = {
            "MAGIC": MAGIC,
            "VERSION": INTERFACE_VERSION,
            "APERTURE_SIZE": aperture_size,
            "GRANULE": granule,
            "FEATURES": int(features),
        }
        self._getters: list[tuple[Register, Callable[[], int]]] = []
        self._rw = bytearray(_SCALAR_END)
        self._rw_mask = bytearray(_SCALAR_END)
        for reg in REGISTERS:
            if reg.offset >= _SCALAR_END:
                continue
            if reg.name in constants:
                self._getters.append((reg, _constant(constants[reg.name])))
            elif reg.name in COUNTER_REGISTERS:
                self._getters.append((reg, _counter_getter(counters, COUNTER_REGISTERS[reg.name])))
            elif reg.name == "IRQ_STATUS":
                self._getters.append((reg, irq_status))
            elif reg.access is RW:
                self._rw_mask[reg.offset : reg.offset + reg.width] = b"\xff" * reg.width
            elif reg.access is WO:
                pass  # reads 0: the bytes of `_rw` under it are never written
            else:
                raise AssertionError(f"register {reg.name} has no value source")
        # Per 8-byte block of the scalar registers, the value sources inside it: a read (at
        # most 8 bytes, naturally aligned, so inside one block) renders only its own block's
        # registers, not all of them (a trapped BAR2 read paid ~8 us for the whole image).
        # Every register is 4 or 8 bytes at a multiple of its width, so none crosses a block,
        # and the scalar registers end on a block boundary.
        assert _SCALAR_END % 8 == 0
        blocks: list[list[tuple[int, int, int, Callable[[], int]]]] = [
            [] for _ in range(_SCALAR_END // 8)
        ]
        for reg, getter in self._getters:
            assert reg.offset % reg.width == 0 and reg.width in (4, 8), reg.name
            blocks[reg.offset >> 3].append(
                (reg.offset & 7, reg.width, (1 << (8 * reg.width)) - 1, getter)
            )
        self._blocks = tuple(tuple(block) for block in blocks)
        self._pending_msix = pending_msix
        # Registers whose writes act, (offset, width, action(value written)); a write covering
        # part of one acts with the bytes it wrote and zeros for the rest.
        actions = {"DOORBELL": doorbell, "IRQ_STATUS": irq_ack}
        self._actions = tuple(
            (REGISTER_BY_NAME[name].offset, REGISTER_BY_NAME[name].width, action)
            for name, action in actions.items()
        )
        self._msix_table = bytearray(_MSIX_ENTRY_RESET * MSIX_VECTORS)

    @property
    def scratch(self) -> int:
        reg = REGISTER_BY_NAME["SCRATCH"]
        return int.from_bytes(self._rw[reg.offset : reg.offset + reg.width], "little")

    def read(self, offset: int, size: int) -> bytes:
        if (error := shape_error(offset, size, REGISTER_BAR_SIZE, "BAR2")) is not None:
            raise error
        if offset < _SCALAR_END:
            base = offset & ~7
            block = self._rw[base : base + 8]
            for at, width, mask, getter in self._blocks[base >> 3]:
                block[at : at + width] = (getter() & mask).to_bytes(width, "little")
            at = offset - base
            return bytes(block[at : at + size])
        rel = offset - MSIX_TABLE_OFFSET
        if 0 <= rel < len(self._msix_table):
            return bytes(self._msix_table[rel : rel + size])
        rel = offset - MSIX_PBA_OFFSET
        if 0 <= rel < MSIX_PBA_SIZE:
            pba = self._pending_msix().to_bytes(MSIX_PBA_SIZE, "little")
            return pba[rel : rel + size]
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        if (error := shape_error(offset, len(data), REGISTER_BAR_SIZE, "BAR2")) is not None:
            raise error
        if offset < _SCALAR_END:
            _masked_store(self._rw, self._rw_mask, offset, data)
            end = offset + len(data)
            for at, width, action in self._actions:
                if at < end and offset < at + width:
                    value = bytearray(width)
                    lo, hi = max(at, offset), min(at + width, end)
                    value[lo - at : hi - at] = data[lo - offset : hi - offset]
                    action(int.from_bytes(value, "little"))
            return
        rel = offset - MSIX_TABLE_OFFSET
        if 0 <= rel < len(self._msix_table):
            _masked_store(self._msix_table, _MSIX_ENTRY_WMASK, rel, data, len(_MSIX_ENTRY_WMASK))

    def msix_entry(self, vector: int) -> tuple[int, int, bool]:
        """(address, data, masked) of one MSI-X table entry, for transports that inject MSIs."""
        entry = self._msix_table[vector * MSIX_ENTRY_SIZE : (vector + 1) * MSIX_ENTRY_SIZE]
        address = int.from_bytes(entry[0:8], "little")
        data = int.from_bytes(entry[8:12], "little")
        return address, data, bool(entry[12] & MSIX_CTRL_MASKED)

    def reset(self) -> None:
        """Power-on contents: scratch 0, every MSI-X entry cleared and masked."""
        self._rw[:] = bytes(len(self._rw))
        self._msix_table[:] = _MSIX_ENTRY_RESET * MSIX_VECTORS


def _constant(value: int) -> Callable[[], int]:
    def read() -> int:
        return value

    return read


def _counter_getter(counters: DeviceCounters, name: str) -> Callable[[], int]:
    getter = attrgetter(name)

    def read() -> int:
        value: int = getter(counters)
        return value

    return read


def _masked_store(
    buf: bytearray, mask: bytes | bytearray, offset: int, data: bytes, period: int = 0
) -> None:
    """Store `data` at `offset` keeping the bits `mask` marks read-only (mask repeats if period)."""
    for i, value in enumerate(data):
        at = offset + i
        writable = mask[at % period] if period else mask[at]
        buf[at] = (buf[at] & ~writable) | (value & writable)
