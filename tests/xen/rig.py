"""The Xen transport's test rig: the real device (as `devmodel run` builds it) on a
simulated hypervisor, with the transport running in the test's own trio loop."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import trio

from devmodel.backend.device import DeviceBackend
from devmodel.counters import DeviceCounters
from devmodel.leases.builtin_lender import BuiltinLender
from devmodel.leases.engine import EngineConfig, LeaseEngine
from devmodel.metrics import AccessTiming
from devmodel.pci.function import PciFunction
from devmodel.pci.identity import PciIdentity
from devmodel.pci.registers import Feature
from devmodel.testing import SimHypervisor, SimVcpu
from devmodel.xen.server import XenServer, serve_xen

APERTURE = 1 << 20
GRANULE = 4096
BAR0 = 0xE000_0000
BAR2 = 0xF000_0000
VENDOR, DEVICE = 0x1234, 0x10E5
CMD_MEMORY = 0x2


@dataclass
class Rig:
    sim: SimHypervisor
    device: PciFunction
    engine: LeaseEngine
    counters: DeviceCounters
    server: XenServer

    @property
    def cpu(self) -> SimVcpu:
        return self.sim.cpus[0]

    async def enable(self, bar0: int = BAR0, bar2: int = BAR2) -> None:
        """What firmware does: program both BARs, then turn memory decoding on."""
        cpu = self.cpu
        await cpu.config_write(0x10, 4, bar0 & 0xFFFFFFFF)
        await cpu.config_write(0x14, 4, bar0 >> 32)
        await cpu.config_write(0x18, 4, bar2)
        await cpu.config_write(0x04, 2, CMD_MEMORY)


def build_device(
    aperture: int = APERTURE, granule: int = GRANULE, config: EngineConfig | None = None
) -> tuple[PciFunction, LeaseEngine, DeviceCounters]:
    counters = DeviceCounters()
    engine = LeaseEngine(aperture, granule, counters, config, timing=AccessTiming())
    device = PciFunction(
        PciIdentity(vendor_id=VENDOR, device_id=DEVICE), engine, counters, features=Feature.LENT
    )
    return device, engine, counters


@contextlib.asynccontextmanager
async def serving(
    sim: SimHypervisor,
    device: PciFunction | DeviceBackend,
    counters: DeviceCounters,
    **kwargs: object,
) -> AsyncIterator[XenServer]:
    """The transport running against `sim` for the body of the `async with`."""
    async with trio.open_nursery() as nursery:
        server: XenServer = await nursery.start(
            lambda task_status: serve_xen(
                device,
                counters,
                sim.domid,
                platform=sim,
                task_status=task_status,
                **kwargs,  # type: ignore[arg-type]
            )
        )
        yield server
        nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def builtin_rig(vcpus: int = 2, enable: bool = True) -> AsyncIterator[Rig]:
    """The default device (built-in lender, everything lent) served to a 2-vCPU guest."""
    device, engine, counters = build_device()
    lender = BuiltinLender(engine, 64 << 10)
    lender.lend_everything()
    sim = SimHypervisor(vcpus=vcpus)
    try:
        async with serving(sim, device, counters) as server:
            rig = Rig(sim, device, engine, counters, server)
            if enable:
                await rig.enable()
            with trio.fail_after(10):  # a transport that stalls fails the test, never hangs it
                yield rig
    finally:
        engine.close()
        lender.close()
