"""The PCI root devmodel adds to a PVH guest's ACPI tables (devmodel/xen/pvh_acpi.py), against
the simulated hypervisor with tables laid out as libxl lays them out: the RSDP rewritten in
guest RAM, the new XSDT/RSDT and SSDT read back through Xen's MMIO routing as the guest would,
an HVM guest and `off` untouched, and a missing or corrupt RSDP only a warning."""

from __future__ import annotations

import logging
import struct

import pytest

from devmodel.testing import SimHypervisor
from devmodel.xen.pvh_acpi import TABLES_BASE, WINDOW_32, WINDOW_64
from devmodel_wire.acpi import (
    checksum_ok,
    eisa_id,
    parse_root_table,
    parse_rsdp,
    parse_table_header,
)
from tests.xen.rig import build_device, serving

PVH_ACPI = "PVH ACPI: PCI root PCI0 (bus 0"


def pvh_sim() -> SimHypervisor:
    return SimHypervisor(device_model=False)


async def read_table(sim: SimHypervisor, address: int) -> bytes:
    """A table as the guest reads it: its header, then the rest, 4 bytes at a time."""
    cpu = sim.cpus[0]
    head = await cpu.read_bytes(address, 36, 4)
    length = parse_table_header(head).length
    return await cpu.read_bytes(address, (length + 3) & ~3, 4)


@pytest.mark.parametrize("rsdp_low", [False, True])
async def test_the_rsdp_points_at_our_tables_which_add_the_pci_root(
    rsdp_low: bool, caplog: pytest.LogCaptureFixture
) -> None:
    sim = pvh_sim()
    at = sim.add_libxl_acpi(rsdp_low=rsdp_low)
    old_xsdt = bytes(sim.ram_at(at["XSDT"], 52))
    device, _, counters = build_device()
    caplog.set_level(logging.INFO, "devmodel.xen")
    async with serving(sim, device, counters) as server:
        rsdp = parse_rsdp(sim.ram_at(at["RSDP"], 36))
        assert rsdp.xsdt_address == TABLES_BASE
        assert rsdp.rsdt_address is not None and rsdp.rsdt_address > TABLES_BASE
        xsdt = await read_table(sim, TABLES_BASE)
        xsdt = xsdt[: parse_table_header(xsdt).length]
        assert checksum_ok(xsdt)
        entries = parse_root_table(xsdt, 8)
        assert entries[:-1] == [at["FADT"], at["APIC"]]  # the old ones, in order
        rsdt = await read_table(sim, rsdp.rsdt_address)
        assert parse_root_table(rsdt, 4) == entries
        ssdt = await read_table(sim, entries[-1])
        ssdt = ssdt[: parse_table_header(ssdt).length]
        assert ssdt[:4] == b"SSDT" and checksum_ok(ssdt)
        assert b"PCI0" in ssdt and struct.pack("<I", eisa_id("PNP0A03")) in ssdt
        assert struct.pack("<II", WINDOW_32.base, WINDOW_32.end) in ssdt
        assert struct.pack("<QQ", WINDOW_64.base, WINDOW_64.end) in ssdt
        # `rep movsl` of the XSDT's header into guest RAM (a memcpy from the table).
        await sim.cpus[1].rep(TABLES_BASE, 4, 9, read=True, buffer=0x8000)
        assert bytes(sim.ram_at(0x8000, 36)) == xsdt[:36]
        # Read-only: a guest write changes nothing and is counted.
        await sim.cpus[1].write(TABLES_BASE, 4, 0)
        assert await sim.cpus[0].read(TABLES_BASE, 4) == int.from_bytes(b"XSDT", "little")
        assert server.acpi is not None and server.acpi.dropped_writes == 1
    # The old XSDT in RAM is left as it was; the page is unclaimed on the way out.
    assert bytes(sim.ram_at(at["XSDT"], 52)) == old_xsdt
    assert PVH_ACPI in caplog.text and f"RSDP at {at['RSDP']:#x}" in caplog.text
    assert "map_io_range" in sim.calls and sim.servers[1].mmio == []


async def test_an_rsdp_without_rsdt_gets_a_new_xsdt_only() -> None:
    sim = pvh_sim()
    at = sim.add_libxl_acpi(rsdt=False)
    device, _, counters = build_device()
    async with serving(sim, device, counters):
        rsdp = parse_rsdp(sim.ram_at(at["RSDP"], 36))
        assert rsdp.xsdt_address == TABLES_BASE and rsdp.rsdt_address == 0


@pytest.mark.parametrize(
    ("kwargs", "device_model"),
    [({"pvh_acpi_root": "off"}, False), ({}, True), ({"pci_config_ports": "off"}, False)],
)
async def test_off_an_hvm_guest_or_no_ports_leave_the_tables(
    kwargs: dict[str, str], device_model: bool
) -> None:
    sim = SimHypervisor(device_model=device_model)
    at = sim.add_libxl_acpi()
    before = bytes(sim.ram_at(at["RSDP"], 36))
    device, _, counters = build_device()
    async with serving(sim, device, counters, **kwargs):
        assert bytes(sim.ram_at(at["RSDP"], 36)) == before
        assert await sim.cpus[0].read(TABLES_BASE, 4) == 0xFFFF_FFFF  # nobody claimed it


async def test_on_still_never_touches_an_hvm_guest(caplog: pytest.LogCaptureFixture) -> None:
    sim = SimHypervisor(device_model=True)
    at = sim.add_libxl_acpi()
    before = bytes(sim.ram_at(at["RSDP"], 36))
    device, _, counters = build_device()
    async with serving(sim, device, counters, pci_config_ports="on", pvh_acpi_root="on"):
        assert bytes(sim.ram_at(at["RSDP"], 36)) == before
    assert "the guest has a device model" in caplog.text


@pytest.mark.parametrize("damage", ["none", "rsdp-checksum", "xsdt-checksum", "xsdt-length"])
async def test_a_missing_or_corrupt_table_is_a_warning_and_startup_goes_on(
    damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    sim = pvh_sim()
    if damage != "none":
        at = sim.add_libxl_acpi()
        if damage == "rsdp-checksum":
            sim.ram_at(at["RSDP"] + 9, 1)[0] ^= 0x20
        elif damage == "xsdt-checksum":
            sim.ram_at(at["XSDT"] + 36, 1)[0] ^= 1
        else:
            sim.ram_at(at["XSDT"] + 4, 4)[:] = (1 << 20).to_bytes(4, "little")
        before = bytes(sim.ram_at(at["RSDP"], 36))
    device, _, counters = build_device()
    async with serving(sim, device, counters) as server:
        assert server.acpi is None
        assert server.ports is not None  # the configuration ports are served all the same
        if damage != "none":
            assert bytes(sim.ram_at(at["RSDP"], 36)) == before
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("PVH ACPI: no PCI root added" in r.getMessage() for r in warnings), caplog.text


async def test_on_without_the_ports_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    sim = pvh_sim()
    at = sim.add_libxl_acpi()
    before = bytes(sim.ram_at(at["RSDP"], 36))
    device, _, counters = build_device()
    async with serving(sim, device, counters, pci_config_ports="off", pvh_acpi_root="on"):
        assert bytes(sim.ram_at(at["RSDP"], 36)) == before
    assert "the PCI configuration ports are not served" in caplog.text
