"""A PCI root in a PVH guest's ACPI tables, so that its Linux enumerates the function unaided.

Why: a PVH guest has no QEMU and no hvmloader. devmodel answers its PCI configuration ports
and presents a host bridge (pci_ports.py), so Linux finds type 1 config access; but with ACPI
on, Linux takes its PCI root buses only from the ACPI namespace (`PNP0A03` devices), and the
tables libxl builds for every PVH guest (tools/libs/light/libxl_x86_acpi.c: a DSDT with the
processors, nothing else) describe none. Linux then scans no bus; only `pci=noacpi` helped.
QEMU describes its own PCI root to HVM guests; here the device model does the same for the
root it emulates.

What happens, once, at startup while the guest is still paused (devmodel runs between
`xl create -p` and `xl unpause`):

1. find the RSDP ("RSD PTR ", 16-byte aligned, checksums valid). libxl puts it at 0xFFFC0
   (the last 64 bytes below 1 MiB, for Linux versions that ignore `hvm_start_info.rsdp_paddr`)
   or at the start of the page right after its tables, which begin one page above
   ACPI_INFO_PHYSICAL_ADDRESS (0xFC000000) and take at most 16 pages;
2. read its XSDT (and RSDT, if it has one);
3. build an SSDT with `\\_SB.PCI0` (devmodel_wire.acpi.pci_root_ssdt) and a new XSDT (RSDT)
   listing the old entries plus the SSDT;
4. serve those from one page of MMIO that this server claims, read-only, at TABLES_BASE: a
   guest-physical address in libxl's MMIO hole below 4 GiB (low RAM ends at or below
   0xF0000000, HVM_BELOW_4G_RAM_END) that is neither in a BAR window below, nor the ACPI
   info at 0xFC000000, nor the LAPIC at 0xFEE00000. New tables are not written into guest
   RAM: no page there is both free and reserved from the guest;
5. rewrite the RSDP in place (a foreign mapping) to point at them, checksums recomputed.

Anything unexpected (no RSDP, a bad checksum, tables that do not fit) is logged as one warning
and nothing is changed: the ports still work, and `pci=noacpi` still does. An HVM guest's tables
belong to hvmloader and QEMU and are never touched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from devmodel.backend.bus import Region
from devmodel.backend.device import DeviceBackend
from devmodel.config import PVH_ACPI_ROOT
from devmodel.pci.errors import AccessError
from devmodel.xen.platform import XenError, XenPlatform
from devmodel_wire.acpi import (
    HEADER_SIZE,
    RSDP_SIGNATURE,
    RSDP_V2_SIZE,
    AcpiError,
    MemoryWindow,
    PciRoot,
    Rsdp,
    encode_rsdt,
    encode_xsdt,
    parse_root_table,
    parse_rsdp,
    parse_table_header,
    pci_root_ssdt,
    rewrite_rsdp,
)
from devmodel_wire.xen import PAGE_SIZE

__all__ = [
    "ACPI_INFO_ADDRESS",
    "PVH_ACPI_ROOT",
    "TABLES_BASE",
    "WINDOW_32",
    "WINDOW_64",
    "AcpiTables",
    "PvhAcpiRoot",
    "find_rsdp",
    "install_pvh_acpi_root",
]

log = logging.getLogger("devmodel.xen")

ACPI_INFO_ADDRESS: Final = 0xFC000000
"""libacpi's ACPI_INFO_PHYSICAL_ADDRESS: libxl's acpi_info page; the tables follow it."""
ACPI_TABLE_PAGES: Final = 18
"""Pages scanned above the acpi_info page: libxl's 16 pages of tables, the RSDP's page right
after whatever they used, and one spare."""
LOW_RSDP_AREA: Final = (0xE0000, 0x100000)
"""Where ACPI's standard search finds an RSDP, and libxl may put it (at 0xFFFC0)."""

TABLES_BASE: Final = 0xFB000000
TABLES_SIZE: Final = PAGE_SIZE
"""The page of MMIO that serves the new XSDT, RSDT and SSDT."""

WINDOW_32: Final = MemoryWindow(0xF0000000, TABLES_BASE - 0xF0000000)
"""Below 4 GiB: from the end of libxl's low RAM (HVM_BELOW_4G_RAM_END) up to the tables'
page. BAR2 (4 KiB) goes here."""
WINDOW_64: Final = MemoryWindow(256 << 30, 256 << 30, prefetchable=True)
"""Above 4 GiB: 256 GiB from 256 GiB, far above any RAM libxl gives a test guest and below a
39-bit physical address width (the smallest current x86 CPUs report), so it holds a BAR0 of
up to 256 GiB, naturally aligned."""

REGION_INDEX: Final = -1
"""The tables' region on no vfio index (it is no BAR: `region.index` only tells BAR0 apart)."""


@dataclass(frozen=True, slots=True)
class AcpiTables:
    """What the guest is given: the page's bytes and where each table in it lies."""

    page: bytes
    xsdt: int
    rsdt: int | None
    ssdt: int


def _read(platform: XenPlatform, address: int, length: int) -> bytes:
    """`length` bytes of guest RAM at `address`, through a read-only foreign mapping."""
    first = address // PAGE_SIZE
    last = (address + length - 1) // PAGE_SIZE
    mapping = platform.map_guest(list(range(first, last + 1)), writable=False)
    try:
        at = address - first * PAGE_SIZE
        return bytes(mapping.view[at : at + length])
    finally:
        mapping.close()


def _candidate_pages() -> list[int]:
    low = range(LOW_RSDP_AREA[1] // PAGE_SIZE - 1, LOW_RSDP_AREA[0] // PAGE_SIZE - 1, -1)
    first = ACPI_INFO_ADDRESS // PAGE_SIZE + 1
    acpi = range(first, first + ACPI_TABLE_PAGES)
    return [*low, *acpi]


def find_rsdp(platform: XenPlatform) -> tuple[int, Rsdp] | None:
    """The first valid RSDP in the places libxl uses, and its address; None if none is.

    Pages are mapped one at a time and a page that cannot be mapped is skipped: above the
    tables libxl used, nothing is populated."""
    for frame in _candidate_pages():
        try:
            page = _read(platform, frame * PAGE_SIZE, PAGE_SIZE)
        except XenError:
            continue
        at = page.find(RSDP_SIGNATURE)
        while at >= 0:
            if at % 16 == 0:
                try:
                    return frame * PAGE_SIZE + at, parse_rsdp(page[at : at + RSDP_V2_SIZE])
                except AcpiError:
                    pass  # a stray signature, or a broken RSDP: keep looking
            at = page.find(RSDP_SIGNATURE, at + 1)
    return None


def _read_root_table(
    platform: XenPlatform, address: int, entry_size: int
) -> tuple[bytes, list[int]]:
    header = parse_table_header(_read(platform, address, HEADER_SIZE))
    if header.length > TABLES_SIZE:
        raise AcpiError(f"a root table of {header.length} bytes")
    data = _read(platform, address, header.length)
    return data, parse_root_table(data, entry_size)


def build_tables(
    xsdt: bytes | None, rsdt: bytes | None, root: PciRoot, base: int = TABLES_BASE
) -> AcpiTables:
    """The page served at `base`: new XSDT (RSDT) = the old one's entries + the SSDT."""
    ssdt = pci_root_ssdt(root)
    xsdt_len = len(xsdt) + 8 if xsdt is not None else 0
    rsdt_len = len(rsdt) + 4 if rsdt is not None else 0

    def align(n: int) -> int:
        return (n + 15) & ~15

    at_rsdt = align(xsdt_len)
    at_ssdt = align(at_rsdt + rsdt_len)
    if at_ssdt + len(ssdt) > TABLES_SIZE:
        raise AcpiError(
            f"the new tables need {at_ssdt + len(ssdt)} bytes, the page has {TABLES_SIZE}"
        )
    page = bytearray(TABLES_SIZE)
    page[at_ssdt : at_ssdt + len(ssdt)] = ssdt
    if xsdt is not None:
        entries = parse_root_table(xsdt, 8)
        new = encode_xsdt([*entries, base + at_ssdt], parse_table_header(xsdt))
        page[0 : len(new)] = new
    if rsdt is not None:
        entries = parse_root_table(rsdt, 4)
        new = encode_rsdt([*entries, base + at_ssdt], parse_table_header(rsdt))
        page[at_rsdt : at_rsdt + len(new)] = new
    return AcpiTables(
        bytes(page),
        base if xsdt is not None else 0,
        base + at_rsdt if rsdt is not None else None,
        base + at_ssdt,
    )


class PvhAcpiRoot:
    """The served page of tables: claimed from Xen, routed before the BARs, read-only."""

    def __init__(self, tables: AcpiTables, base: int = TABLES_BASE) -> None:
        self.tables = tables
        self.base = base
        self.size = TABLES_SIZE
        self.reads = 0
        self.dropped_writes = 0
        """Guest writes to the tables: dropped (firmware tables are read-only), counted."""
        self.region = Region(REGION_INDEX, "PVH ACPI tables", self.size, self._read, self._write)
        self.region.address = base
        self.region.read_now = self.read_now

    def read_now(self, offset: int, size: int) -> bytes:
        """Any read: the page's bytes, all-ones past its end (as unclaimed MMIO reads)."""
        self.reads += 1
        data = self.tables.page[offset : offset + size]
        return data + b"\xff" * (size - len(data))

    async def _read(self, offset: int, size: int) -> bytes:
        if size not in (1, 2, 4, 8):
            raise AccessError(22, f"a {size}-byte read of the ACPI tables")
        return self.read_now(offset, size)

    async def _write(self, offset: int, data: bytes) -> None:
        self.dropped_writes += 1

    def routed(
        self, inner: Callable[[int], tuple[Region, int] | None]
    ) -> Callable[[int], tuple[Region, int] | None]:
        """`inner` (the bus's route) with this page in front of it."""
        region, base, size = self.region, self.base, self.size

        def route(address: int) -> tuple[Region, int] | None:
            offset = address - base
            if 0 <= offset < size:
                return region, offset
            return inner(address)

        return route


def install_pvh_acpi_root(
    platform: XenPlatform,
    server_id: int,
    backend: DeviceBackend,
    *,
    windows: tuple[MemoryWindow, ...] = (WINDOW_32, WINDOW_64),
    base: int = TABLES_BASE,
) -> tuple[PvhAcpiRoot, Callable[[], None]] | None:
    """Add the PCI root to the paused PVH guest's tables; the served page and its undo.

    None (after one warning) when anything is not as expected; the guest is then unchanged.
    """
    if platform.has_device_model():
        log.warning("PVH ACPI: not adding a PCI root: the guest has a device model (HVM)")
        return None
    try:
        found = find_rsdp(platform)
        if found is None:
            raise AcpiError(
                f"no RSDP at {LOW_RSDP_AREA[0]:#x}-{LOW_RSDP_AREA[1] - 1:#x} or in the "
                f"{ACPI_TABLE_PAGES} pages above {ACPI_INFO_ADDRESS:#x}"
            )
        where, rsdp = found
        xsdt = rsdt = None
        if rsdp.xsdt_address:
            xsdt, _ = _read_root_table(platform, rsdp.xsdt_address, 8)
        if rsdp.rsdt_address:
            rsdt, _ = _read_root_table(platform, rsdp.rsdt_address, 4)
        if xsdt is None and rsdt is None:
            raise AcpiError(f"the RSDP at {where:#x} points at no XSDT or RSDT")
        tables = build_tables(xsdt, rsdt, PciRoot(windows=windows), base)
        new_rsdp = rewrite_rsdp(
            _read(platform, where, rsdp.size),
            rsdt_address=tables.rsdt or 0,
            xsdt_address=tables.xsdt if rsdp.revision >= 2 else None,
        )
    except (AcpiError, XenError, ValueError) as exc:
        log.warning(
            "PVH ACPI: no PCI root added (the guest's Linux scans no PCI bus without "
            "pci=noacpi): %s",
            exc,
        )
        return None
    served = PvhAcpiRoot(tables, base)
    end = base + served.size - 1
    try:
        platform.map_io_range(server_id, True, base, end)
    except XenError as exc:
        log.warning("PVH ACPI: no PCI root added: cannot claim %#x-%#x: %s", base, end, exc)
        return None
    inner = backend.route
    backend.route = served.routed(inner)
    try:
        first = where // PAGE_SIZE
        last = (where + len(new_rsdp) - 1) // PAGE_SIZE
        mapping = platform.map_guest(list(range(first, last + 1)), writable=True)
        try:
            at = where - first * PAGE_SIZE
            mapping.view[at : at + len(new_rsdp)] = new_rsdp
        finally:
            mapping.close()
    except XenError as exc:
        backend.route = inner
        platform.unmap_io_range(server_id, True, base, end)
        log.warning("PVH ACPI: no PCI root added: cannot rewrite the RSDP at %#x: %s", where, exc)
        return None

    def undo() -> None:
        # The guest keeps the rewritten RSDP (it is going away, or keeps its namespace).
        backend.route = inner
        log.info(
            "PVH ACPI: the guest read the tables %d times and wrote them %d times (dropped)",
            served.reads,
            served.dropped_writes,
        )
        platform.unmap_io_range(server_id, True, base, end)

    log.info(
        "PVH ACPI: PCI root PCI0 (bus 0, windows %s) added to the guest's %s; RSDP at %#x, "
        "tables served at %#x",
        ", ".join(f"{w.base:#x}-{w.end:#x}" for w in windows),
        "XSDT and RSDT" if xsdt is not None and rsdt is not None else "XSDT" if xsdt else "RSDT",
        where,
        base,
    )
    return served, undo
