"""The function's interrupts reach the (simulated) hypervisor: MSI and MSI-X messages through
inject_msi, INTx levels through set_pci_intx_level, driven by a guest vCPU ringing BAR2's
DOORBELL and programming config space and the MSI-X table as a driver would."""

from __future__ import annotations

from devmodel.pci import config_space as cs
from devmodel.pci.registers import MSIX_TABLE_OFFSET, REGISTER_BY_NAME
from devmodel.xen.setup import DEFAULT_SBDF
from tests.xen.rig import BAR2, CMD_MEMORY, builtin_rig

DOORBELL = BAR2 + REGISTER_BY_NAME["DOORBELL"].offset
IRQ_STATUS = BAR2 + REGISTER_BY_NAME["IRQ_STATUS"].offset
INTERRUPTS = BAR2 + REGISTER_BY_NAME["INTERRUPTS"].offset
PBA = BAR2 + REGISTER_BY_NAME["MSIX_PBA"].offset
SEG, BUS, DEV, _FN = DEFAULT_SBDF
INTA = (SEG, BUS, DEV, 0)


async def test_intx_rises_on_the_doorbell_and_falls_when_acknowledged() -> None:
    async with builtin_rig() as rig:
        cpu, sim = rig.cpu, rig.sim
        await cpu.write(DOORBELL, 4, 0)
        assert sim.intx_calls == [(*INTA[:3], 0, 1)]
        status = await cpu.config_read(cs.STATUS, 2)
        assert status & cs.STS_INTERRUPT
        await cpu.write(DOORBELL, 4, 0)  # already up: no second call
        assert len(sim.intx_calls) == 1
        # The guest masks the pin (as uio_pci_generic does), then unmasks it: the line follows.
        await cpu.config_write(cs.COMMAND, 2, CMD_MEMORY | cs.CMD_INTX_DISABLE)
        assert sim.intx_level[INTA] == 0
        await cpu.config_write(cs.COMMAND, 2, CMD_MEMORY)
        assert sim.intx_level[INTA] == 1
        await cpu.write(IRQ_STATUS, 4, 1)
        assert sim.intx_level[INTA] == 0
        assert not await cpu.config_read(cs.STATUS, 2) & cs.STS_INTERRUPT
        assert await cpu.read(INTERRUPTS, 8) == 2
        assert sim.msis == []
        # Raised twice as Xen saw it (the doorbell, then the unmask), what the stop line says.
        assert rig.server.interrupts.summary() == "INTx raised 2, MSI injected 0, failed 0"


async def test_a_raised_line_is_lowered_when_the_server_stops() -> None:
    async with builtin_rig() as rig:
        await rig.cpu.write(DOORBELL, 4, 0)
        assert rig.sim.intx_level[INTA] == 1
        server = rig.server
    assert rig.sim.intx_level[INTA] == 0
    assert server.interrupts.errors == 0
    assert rig.device.intx_output is None and rig.device.msi_output is None


async def test_msi_message_from_the_capability() -> None:
    async with builtin_rig() as rig:
        cpu, sim = rig.cpu, rig.sim
        await cpu.config_write(cs.MSI_ADDRESS_LO, 4, 0xFEE0_2000)
        await cpu.config_write(cs.MSI_ADDRESS_HI, 4, 0)
        await cpu.config_write(cs.MSI_DATA, 2, 0x4052)
        await cpu.config_write(cs.MSI_CONTROL, 2, cs.MSI_CTL_ENABLE)
        await cpu.config_write(cs.COMMAND, 2, CMD_MEMORY | cs.CMD_BUS_MASTER)
        await cpu.write(DOORBELL, 4, 0)
        await cpu.write(DOORBELL, 4, 0)
        assert sim.msis == [(0xFEE0_2000, 0x4052)] * 2
        assert sim.intx_calls == []


async def test_msix_entry_masked_until_the_guest_unmasks_it() -> None:
    async with builtin_rig() as rig:
        cpu, sim = rig.cpu, rig.sim
        entry = BAR2 + MSIX_TABLE_OFFSET + 16 * 3
        await cpu.write(entry, 8, 0xFEE0_1000)
        await cpu.write(entry + 8, 4, 0x4061)
        await cpu.config_write(cs.COMMAND, 2, CMD_MEMORY | cs.CMD_BUS_MASTER)
        await cpu.config_write(cs.MSIX_CONTROL, 2, cs.MSIX_CTL_ENABLE)
        await cpu.write(DOORBELL, 4, 3)  # the entry powers on masked
        assert sim.msis == []
        assert await cpu.read(PBA, 8) == 1 << 3
        await cpu.write(entry + 12, 4, 0)  # unmask: the pending message goes out
        assert sim.msis == [(0xFEE0_1000, 0x4061)]
        assert await cpu.read(PBA, 8) == 0
        await cpu.write(DOORBELL, 4, 3)
        assert sim.msis == [(0xFEE0_1000, 0x4061)] * 2
        await cpu.write(DOORBELL, 4, 9)  # no such vector
        assert len(sim.msis) == 2 and await cpu.read(INTERRUPTS, 8) == 2


async def test_a_failing_hypercall_is_counted_not_raised() -> None:
    async with builtin_rig() as rig:
        cpu, sim = rig.cpu, rig.sim
        sim.fail["set_pci_intx_level"] = 3  # ESRCH: the domain is going away
        await cpu.write(DOORBELL, 4, 0)
        assert rig.server.interrupts.errors == 1
        assert await cpu.read(IRQ_STATUS, 4) == 1, "the device still asserts it"
        del sim.fail["set_pci_intx_level"]
