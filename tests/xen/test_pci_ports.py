"""The PCI configuration ports 0xcf8-0xcff and the host bridge, for a guest with no device model
of its own (PVH): plain calls on PciConfigPorts, then Linux's conf1 probe and bus scan through
the simulated hypervisor's port routing."""

from __future__ import annotations

import pytest
import trio

from devmodel.testing import SimHypervisor, SimVcpu
from devmodel.xen.pci_ports import HOST_BRIDGE_ID, PciConfigPorts
from devmodel.xen.server import DEFAULT_SBDF
from tests.xen.rig import APERTURE, DEVICE, VENDOR, build_device, serving

FN = DEFAULT_SBDF  # 00:1e.0


def cf8(dev: int, offset: int, fn: int = 0, bus: int = 0, enable: bool = True) -> int:
    return (1 << 31 if enable else 0) | bus << 16 | dev << 11 | fn << 8 | (offset & 0xFC)


def plain() -> tuple[PciConfigPorts, dict[int, int], list[tuple[int, int, int]]]:
    space = {0x00: VENDOR | DEVICE << 16}
    written: list[tuple[int, int, int]] = []

    def read(offset: int, size: int) -> int:
        return (space.get(offset & ~3, 0) >> 8 * (offset & 3)) & ((1 << 8 * size) - 1)

    def write(offset: int, size: int, value: int) -> None:
        written.append((offset, size, value))

    return PciConfigPorts(FN, read, write), space, written


def test_config_address_is_latched_only_by_4_byte_accesses() -> None:
    ports, _, _ = plain()
    ports.port_write(0xCFB, 1, 0x01)  # conf2's probe: not CONFIG_ADDRESS
    assert ports.port_read(0xCF8, 4) == 0
    ports.port_write(0xCF8, 4, 0x8000_0000)
    assert ports.port_read(0xCF8, 4) == 0x8000_0000
    assert ports.port_read(0xCF8, 2) == 0xFFFF
    assert ports.port_read(0xCFA, 1) == 0xFF


def test_data_port_reaches_the_latched_function_at_every_lane() -> None:
    ports, _, written = plain()
    ports.port_write(0xCF8, 4, cf8(0x1E, 0))
    assert ports.port_read(0xCFC, 4) == VENDOR | DEVICE << 16
    assert ports.port_read(0xCFE, 2) == DEVICE
    assert ports.port_read(0xCFD, 1) == VENDOR >> 8
    ports.port_write(0xCF8, 4, cf8(0x1E, 0x04))
    ports.port_write(0xCFC, 2, 0x1_0006)
    assert written == [(0x04, 2, 0x0006)]


def test_other_functions_buses_and_a_disabled_latch_read_all_ones() -> None:
    ports, _, written = plain()
    for address in (cf8(0x1E, 0, fn=1), cf8(0x1E, 0, bus=1), cf8(3, 0), cf8(0x1E, 0, enable=False)):
        ports.port_write(0xCF8, 4, address)
        assert ports.port_read(0xCFC, 4) == 0xFFFF_FFFF
        ports.port_write(0xCFC, 4, 0)
    assert written == []
    assert ports.port_read(0xCFD, 4) == 0xFFFF_FFFF  # runs past 0xcff: not a data access


def test_the_host_bridge_is_a_read_only_class_0600_function_with_no_bars() -> None:
    ports, _, _ = plain()
    ports.port_write(0xCF8, 4, cf8(0, 0))
    assert ports.port_read(0xCFC, 4) == HOST_BRIDGE_ID[0] | HOST_BRIDGE_ID[1] << 16
    ports.port_write(0xCF8, 4, cf8(0, 0x08))
    assert ports.port_read(0xCFE, 2) == 0x0600  # what pci_sanity_check looks for
    ports.port_write(0xCF8, 4, cf8(0, 0x10))
    ports.port_write(0xCFC, 4, 0xFFFF_FFFF)  # BAR sizing
    assert ports.port_read(0xCFC, 4) == 0
    ports.port_write(0xCF8, 4, cf8(0, 0x0C))
    assert ports.port_read(0xCFE, 1) == 0  # header type 0


def test_the_function_must_be_on_bus_0_and_not_at_the_bridge() -> None:
    with pytest.raises(ValueError, match="bus 0"):
        PciConfigPorts((0, 1, 0, 0), lambda o, s: 0, lambda o, s, v: None)
    with pytest.raises(ValueError, match="host bridge"):
        PciConfigPorts((0, 0, 0, 0), lambda o, s: 0, lambda o, s, v: None)


# ---- through the simulated hypervisor, as the guest's Linux does it


async def conf1_probe(cpu: SimVcpu) -> bool:
    """arch/x86/pci/direct.c pci_check_type1, then pci_sanity_check for a machine without
    DMI (a PVH guest): a host bridge or VGA class, or an Intel or Compaq vendor id, on bus 0."""
    await cpu.port_write(0xCFB, 1, 0x01)
    saved = await cpu.port_read(0xCF8, 4)
    await cpu.port_write(0xCF8, 4, 0x8000_0000)
    works = await cpu.port_read(0xCF8, 4) == 0x8000_0000
    await cpu.port_write(0xCF8, 4, saved)
    if not works:
        return False
    for devfn in range(256):
        await cpu.port_write(0xCF8, 4, cf8(devfn >> 3, 0x08, fn=devfn & 7))
        if await cpu.port_read(0xCFE, 2) in (0x0600, 0x0300):
            return True
    return False


async def scan_bus_0(cpu: SimVcpu) -> dict[int, tuple[int, int]]:
    """Slot -> (vendor:device, class) of function 0 of every slot that answers."""
    found: dict[int, tuple[int, int]] = {}
    for dev in range(32):
        await cpu.port_write(0xCF8, 4, cf8(dev, 0))
        ident = await cpu.port_read(0xCFC, 4)
        if ident & 0xFFFF == 0xFFFF:
            continue
        await cpu.port_write(0xCF8, 4, cf8(dev, 0x08))
        found[dev] = (ident, await cpu.port_read(0xCFC, 4) >> 8)
    return found


async def test_a_pvh_guest_finds_type_1_and_enumerates_the_function() -> None:
    device, engine, counters = build_device()
    sim = SimHypervisor(device_model=False)
    async with serving(sim, device, counters) as server:
        assert server.ports is not None
        s = sim.server()
        assert s.pio == [(0xCF8, 0xCFF)]
        assert s.pcidevs == {FN, (0, 0, 0, 0)}
        cpu = sim.cpus[0]
        with trio.fail_after(10):
            assert await conf1_probe(cpu)
            found = await scan_bus_0(cpu)
        assert found == {
            0: (HOST_BRIDGE_ID[0] | HOST_BRIDGE_ID[1] << 16, 0x060000),
            0x1E: (VENDOR | DEVICE << 16, 0x050000),
        }
        # BAR0 sizing through the ports: 64-bit prefetchable memory of the aperture's size.
        await cpu.port_write(0xCF8, 4, cf8(0x1E, 0x10))
        await cpu.port_write(0xCFC, 4, 0xFFFF_FFFF)
        low = await cpu.port_read(0xCFC, 4)
        assert low & 0xF == 0xC and (~(low & 0xFFFF_FFF0) & 0xFFFF_FFFF) + 1 == APERTURE
        # Xen decoded the data accesses itself (its latch was enabled): PCI_CONFIG requests.
        assert counters.bad_accesses == counters.protocol_errors == 0
    assert s.pio == [] and s.pcidevs == set()  # released on the way out
    engine.close()


async def test_without_the_ports_a_pvh_guest_finds_no_config_access() -> None:
    """What Linux saw on the real hypervisor: `PCI: Fatal: No config space access function
    found` (0xcf8 reads back all-ones)."""
    device, engine, counters = build_device()
    sim = SimHypervisor(device_model=False)
    async with serving(sim, device, counters, pci_config_ports="off") as server:
        assert server.ports is None and sim.server().pio == []
        with trio.fail_after(10):
            assert not await conf1_probe(sim.cpus[0])
    engine.close()


async def test_auto_leaves_the_ports_to_an_hvm_guests_qemu_and_on_forces_them() -> None:
    device, engine, counters = build_device()
    sim = SimHypervisor()  # an HVM guest, QEMU beside
    async with serving(sim, device, counters) as server:
        assert server.ports is None
        assert sim.server().pio == [] and sim.server().pcidevs == {FN}
    sim = SimHypervisor()
    async with serving(sim, device, counters, pci_config_ports="on") as server:
        assert server.ports is not None and sim.server().pio == [(0xCF8, 0xCFF)]
        # Ports other than the configuration ports are still not ours.
    engine.close()


async def test_data_port_accesses_forwarded_as_port_io_use_devmodels_latch() -> None:
    """If Xen forwards 0xcfc as port I/O (its latch disabled), devmodel's own latch decides:
    disabled, all-ones."""
    device, engine, counters = build_device()
    sim = SimHypervisor(device_model=False)
    async with serving(sim, device, counters):
        cpu = sim.cpus[0]
        with trio.fail_after(10):
            await cpu.port_write(0xCF8, 4, cf8(0x1E, 0, enable=False))
            assert await cpu.port_read(0xCFC, 4) == 0xFFFF_FFFF
            assert await cpu.port_read(0xCF8, 4) == cf8(0x1E, 0, enable=False)
        assert counters.bad_accesses == 0
    engine.close()
