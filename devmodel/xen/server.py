"""The Xen transport: an alternate ioreq server that presents the device backend to one guest.

Xen traps the guest's accesses to what this server claimed (one PCI function's config cycles,
and the BARs' MMIO ranges while memory decoding is on) and writes each into the trapping vCPU's
slot of the shared ioreq page. This module wires the parts together and owns their lifetime:

- setup.py: setup and teardown with Xen, readiness in xenstore;
- bar_claims.py: the MMIO ranges claimed, following the backend's region bus;
- vcpus.py: the dispatch loop and one worker per vCPU;
- request.py: one request decoded and served on the backend;
- posted.py: the buffered ring of posted writes;
- interrupts.py: the function's MSI/MSI-X messages and INTx line to the hypervisor;
- p2m.py: the seam for the lending hypercall.

Everything host-specific goes through `XenPlatform` (platform.py): the real one binds Xen's
tool libraries, tests pass a simulated hypervisor. The slot and ring layouts come from
protocol/devmodel_wire/xen, which is checked against Xen's headers.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Callable
from typing import Final

import trio

from devmodel.backend.bus import MappedRange
from devmodel.backend.device import DeviceBackend, backend_for
from devmodel.config import PCI_CONFIG_PORTS, PVH_ACPI_ROOT
from devmodel.control.toolstack import StartupError
from devmodel.counters import DeviceCounters
from devmodel.pci.function import PciFunction
from devmodel.ratelimit import RateLimitedLogger
from devmodel.xen.bar_claims import BarClaims
from devmodel.xen.interrupts import XenInterrupts
from devmodel.xen.open_host import open_host
from devmodel.xen.p2m import EmulateEverything, P2mMapper
from devmodel.xen.pci_ports import PciConfigPorts
from devmodel.xen.platform import XenError, XenPlatform
from devmodel.xen.posted import PostedWrites
from devmodel.xen.pvh_acpi import PvhAcpiRoot, install_pvh_acpi_root
from devmodel.xen.request import MAX_REP_BYTES, IoreqHandler
from devmodel.xen.setup import DEFAULT_SBDF, STATE_KEY, IoreqServerSetup, Step
from devmodel.xen.vcpus import VcpuWorkers
from devmodel_wire.xen import BufferedRing, XenAbiError

__all__ = [
    "DEFAULT_SBDF",
    "MAX_REP_BYTES",
    "PCI_CONFIG_PORTS",
    "STATE_KEY",
    "EmulateEverything",
    "P2mMapper",
    "XenServer",
    "serve_xen",
]

log = logging.getLogger("devmodel.xen")

_GONE: Final = frozenset({errno.ENOENT, errno.ESRCH})
"""What Xen answers for a server (ENOENT) or domain (ESRCH) that no longer exists."""


async def serve_xen(
    device: PciFunction | DeviceBackend,
    counters: DeviceCounters,
    domid: int,
    *,
    platform: XenPlatform | None = None,
    sbdf: tuple[int, int, int, int] = DEFAULT_SBDF,
    mapper: P2mMapper | None = None,
    state_key: str = STATE_KEY,
    pci_config_ports: str = "auto",
    pvh_acpi_root: str = "auto",
    on_domain_end: Callable[[str], None] | None = None,
    task_status: trio.TaskStatus[XenServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `device` (a PCI function or its backend) to guest `domid` until cancelled.

    `pci_config_ports`: "on" to answer the PCI configuration ports 0xcf8-0xcff and present a
    host bridge (pci_ports.py), "off" not to, "auto" (default) to do so when the guest has no
    device model of its own (a PVH guest: no QEMU to answer them).
    `pvh_acpi_root`: "on"/"auto" (default) to add a PCI root to a PVH guest's ACPI tables
    when the ports are served (pvh_acpi.py), "off" not to.

    `on_domain_end(reason)` is called once if the guest goes away while served (`xl destroy`,
    a crash the toolstack cleans up): xenstore's @releaseDomain watch says so. `devmodel run`
    passes its stop, so an instance the toolstack forgets does not outlive its guest.

    Without `platform` the real host is opened; either way this function owns the platform
    and closes it on the way out (and the backend, if it made one). A failure before the
    server serves raises StartupError (`devmodel run` exits 1 with its message) after undoing
    whatever was set up.
    """
    if platform is None:
        platform = open_host(domid)
    backend, owned = backend_for(device)
    if pci_config_ports not in PCI_CONFIG_PORTS:
        raise ValueError(f"pci_config_ports must be one of {PCI_CONFIG_PORTS}")
    if pvh_acpi_root not in PVH_ACPI_ROOT:
        raise ValueError(f"pvh_acpi_root must be one of {PVH_ACPI_ROOT}")
    server = XenServer(backend, counters, platform, sbdf, mapper or EmulateEverything())
    server.pci_config_ports = pci_config_ports
    server.pvh_acpi_root = pvh_acpi_root
    server.on_domain_end = on_domain_end
    try:
        try:
            server.start(state_key.format(domid=domid))
        except (XenError, XenAbiError) as exc:
            raise StartupError(
                f"cannot set up the ioreq server for domain {domid}: {exc}"
            ) from None
        await server.run(task_status)
    finally:
        server.stop()
        if owned:
            backend.close()


class XenServer:
    """One ioreq server: its parts, started in order and stopped in reverse."""

    def __init__(
        self,
        backend: DeviceBackend,
        counters: DeviceCounters,
        platform: XenPlatform,
        sbdf: tuple[int, int, int, int],
        mapper: P2mMapper,
    ) -> None:
        self.backend = backend
        self.device = backend.function
        self.counters = counters
        self.platform = platform
        self.mapper = mapper
        self.setup = IoreqServerSetup(platform, sbdf)
        self._log = RateLimitedLogger(log)
        self.handler = IoreqHandler(backend, platform, sbdf, mapper, self._log)
        self.claims: BarClaims | None = None
        self.interrupts = XenInterrupts(platform, sbdf, self._log)
        self.posted = PostedWrites(
            None, counters, self.handler.write, self._log, self.handler.write_now
        )
        self.workers: VcpuWorkers | None = None
        self._hook_installed = False
        self._stopped = False
        self.pci_config_ports = "auto"
        self.ports: PciConfigPorts | None = None
        self._port_unclaims: list[Step] = []
        self.pvh_acpi_root = "auto"
        self.acpi: PvhAcpiRoot | None = None
        self.on_domain_end: Callable[[str], None] | None = None

    # --- what tests and the REPL look at --------------------------------------------------------

    @property
    def server_id(self) -> int | None:
        return self.setup.server_id

    @property
    def vcpu_port(self) -> list[int]:
        return self.setup.vcpu_port

    @property
    def ranges(self) -> list[MappedRange]:
        return self.claims.ranges if self.claims is not None else []

    @property
    def ring(self) -> BufferedRing:
        return self.posted.ring

    @property
    def served(self) -> int:
        return self.workers.served if self.workers is not None else 0

    @property
    def _busy(self) -> list[bool]:
        return self.workers.busy if self.workers is not None else []

    # --- lifetime -------------------------------------------------------------------------------

    def start(self, state_key: str) -> None:
        """Everything up to enabling the server and announcing it; undone by `stop`."""
        setup = self.setup
        sid = setup.open()
        hooks = getattr(self.device.aperture, "unmap_hooks", None)
        if isinstance(hooks, list):
            hooks.append(self.mapper.unmap)
            self._hook_installed = True
        self.posted.page = setup.bufioreq
        self.claims = BarClaims(self.platform, sid, self.backend.bus, self.mapper)
        self.claims.start()
        if self._wants_config_ports():
            self._claim_config_ports(sid)
            if self.pvh_acpi_root != "off":
                self._add_acpi_root(sid)
        elif self.pvh_acpi_root == "on":
            log.warning("PVH ACPI: no PCI root added: the PCI configuration ports are not served")
        self.interrupts.install(self.device)
        # Enable, then bind: Xen writes the vCPUs' ports into the page only at enable.
        setup.enable()
        self.workers = VcpuWorkers(
            self.platform,
            setup.ioreq,
            setup.vcpu_port,
            setup.buf_port,
            self.posted,
            self.handler.serve,
            self._log,
            self.handler.serve_now,
            self.handler.mmio_now,
            self.backend.follow_up,
        )
        setup.announce(state_key)

    def _wants_config_ports(self) -> bool:
        mode = self.pci_config_ports
        if mode != "auto":
            return mode == "on"
        other = self.platform.has_device_model()
        log.info(
            "PCI configuration ports: %s",
            "left to the guest's device model"
            if other
            else "served here (the guest has no device model of its own)",
        )
        return not other

    def _claim_config_ports(self, sid: int) -> None:
        """Claim ports 0xcf8-0xcff and the host bridge's config cycles (pci_ports.py)."""
        p = self.platform
        handler = self.handler
        ports = PciConfigPorts(
            self.setup.sbdf, handler.function_config_read, handler.function_config_write
        )
        (first, last), bridge = ports.claims()
        p.map_io_range(sid, False, first, last)
        self._port_unclaims.append(
            (
                f"unclaim ports {first:#x}-{last:#x}",
                lambda: p.unmap_io_range(sid, False, first, last),
            )
        )
        p.map_pcidev(sid, *bridge)
        self._port_unclaims.append(
            ("unclaim the host bridge", lambda: p.unmap_pcidev(sid, *bridge))
        )
        self.ports = handler.ports = ports
        log.info("serving PCI configuration ports %#x-%#x and host bridge 00:00.0", first, last)

    def _add_acpi_root(self, sid: int) -> None:
        """Describe the PCI root in a PVH guest's ACPI tables (pvh_acpi.py); a warning if not."""
        added = install_pvh_acpi_root(self.platform, sid, self.backend)
        if added is not None:
            self.acpi, undo = added
            self._port_unclaims.append(("unclaim the ACPI tables' page", undo))

    async def run(self, task_status: trio.TaskStatus[XenServer]) -> None:
        """Start a worker per vCPU, report started, then dispatch events until cancelled."""
        workers = self.workers
        assert workers is not None
        async with trio.open_nursery() as nursery:
            workers.start_workers(nursery)
            if self.setup.buf_port is not None:
                nursery.start_soon(self.posted.run)
            if self.on_domain_end is not None:
                nursery.start_soon(self._watch_domain_end, self.on_domain_end)
            task_status.started(self)
            await workers.dispatch()

    async def _watch_domain_end(self, on_end: Callable[[str], None]) -> None:
        """Wait for @releaseDomain events and tell `on_end` when one is the guest's.

        Without the watch (xenstored refusing it) devmodel serves on and says so: stopping it
        is then the toolstack's job alone, as it is for QEMU."""
        platform = self.platform
        domid = platform.domid
        try:
            fd = platform.watch_domain_end()
            while not platform.domain_ended():
                await trio.lowlevel.wait_readable(fd)
        except XenError as exc:
            log.warning(
                "cannot watch for the end of domain %d (@releaseDomain): %s; "
                "the toolstack must stop devmodel when the guest goes",
                domid,
                exc,
            )
            return
        log.info("domain %d is gone (@releaseDomain)", domid)
        on_end(f"domain {domid} ended")

    def stop(self) -> None:
        """Undo `start` in reverse, whatever state it reached; each step is tried alone."""
        if self._stopped:
            return
        self._stopped = True
        if self.workers is not None:
            self.workers.stopped = True
        self.interrupts.uninstall()
        unclaims: list[Step] = self.claims.release_steps() if self.claims is not None else []
        unclaims += self._port_unclaims
        steps = self.setup.teardown_steps(unclaims)
        if self._hook_installed:
            hooks = getattr(self.device.aperture, "unmap_hooks", [])
            with contextlib.suppress(ValueError):
                hooks.remove(self.mapper.unmap)
        gone = False
        for what, step in steps:
            try:
                step()
            except (XenError, OSError) as exc:
                if exc.errno in _GONE:
                    # The domain was destroyed (`xl destroy`) and its ioreq server with it:
                    # every later step on the server fails the same way. Said once, quietly.
                    if not gone:
                        log.info(
                            "stopping: the ioreq server is already gone (domain destroyed?): "
                            "cannot %s: %s",
                            what,
                            exc,
                        )
                    gone = True
                    continue
                log.warning("stopping: cannot %s: %s", what, exc)
        self.setup.closed()
        log.info(
            "ioreq server stopped after %d requests; interrupts: %s",
            self.served,
            self.interrupts.summary(),
        )
