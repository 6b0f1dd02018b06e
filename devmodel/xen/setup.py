"""The ioreq server's setup and teardown with Xen, and its readiness in xenstore.

Setup runs in the order Xen and libxl need: restrict the handles to the guest, create the
server, map its pages, claim the PCI function (`open`); the caller then claims the BARs (and the
PCI configuration ports, if it serves them); `enable` enables the server and only then binds one
event channel per vCPU (and the buffered ring's); `announce` writes the readiness key last.

Enable, then bind: Xen clears the ioreq page when it allocates it and writes each vCPU's
`vp_eport` into its slot only when the server is enabled (Xen 4.20 common/ioreq.c,
`ioreq_server_enable` -> `ioreq_update_evtchn`); binding earlier reads port 0 and
`xenevtchn_bind_interdomain` fails with EINVAL. QEMU (`xen_register_ioreq`) does the same.

Teardown undoes whatever setup reached, in reverse (disable, then unbind), each step on its
own, so one failing step never leaves the others undone.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from functools import partial
from typing import Final

from devmodel.xen.platform import IoreqPages, XenError, XenPlatform
from devmodel_wire.xen import IOREQ_SIZE, SLOTS_PER_PAGE, BufioreqMode, read_slot

__all__ = ["BUFIOREQ_MODE", "DEFAULT_SBDF", "STATE_KEY", "IoreqServerSetup", "Step"]

log = logging.getLogger("devmodel.xen")

Step = tuple[str, Callable[[], None]]
"""One teardown step: what it does (for the log) and the call."""

DEFAULT_SBDF: Final = (0, 0, 0x1E, 0)
"""Where the function appears: 0000:00:1e.0. QEMU, the guest's default device model, gives
its devices (emulated NICs, passed-through devices) the lowest free slot, so a slot near the
top of bus 0 is the least likely to collide; a collision would hide QEMU's device there."""

BUFIOREQ_MODE: Final = BufioreqMode.LEGACY
"""LEGACY, not ATOMIC: in ATOMIC mode Xen rewrites both ring pointers with a 64-bit
compare-and-swap, which a consumer must answer with an atomic add that Python cannot do on
shared memory (devmodel_wire.xen BufioreqMode). The ring matters little here: Xen posts only VGA
writes and TIMEOFFSET there, but a server without one makes Xen log an error at every RTC
update the guest makes."""

STATE_KEY: Final = "/local/domain/0/device-model/{domid}/devmodel/state"
"""Readiness in xenstore. Not libxl's `~/device-model/<domid>/state`: that key belongs to the
guest's device model proper (QEMU writes it, libxl reads and deletes it), and an alternate
ioreq server writing or removing it would corrupt libxl's view of QEMU. It sits under
libxl's directory for the guest so that libxl's cleanup at domain destruction removes it even
if this process died without doing so. docs/xen.md says more."""


class IoreqServerSetup:
    """What one ioreq server holds from Xen: its id, pages, ports, the PCI function, the key."""

    def __init__(self, platform: XenPlatform, sbdf: tuple[int, int, int, int]) -> None:
        self.platform = platform
        self.sbdf = sbdf
        self.server_id: int | None = None
        self.enabled = False
        self.vcpus = 0
        self.pages: IoreqPages | None = None
        self.ioreq: memoryview | bytearray = bytearray()
        self.bufioreq: memoryview | None = None
        self.vcpu_port: list[int] = []  # vCPU -> local port
        self.buf_port: int | None = None
        self.pcidev_mapped = False
        self.state_key: str | None = None

    def open(self) -> int:
        """Everything before the BARs are claimed; returns the server id."""
        p = self.platform
        p.restrict()
        vcpus = p.vcpu_count()
        if not 0 < vcpus <= SLOTS_PER_PAGE:
            raise XenError(
                errno.E2BIG,
                f"the guest has {vcpus} vCPUs; one ioreq page serves 1 to {SLOTS_PER_PAGE}",
            )
        self.vcpus = vcpus
        sid = self.server_id = p.create_ioreq_server(BUFIOREQ_MODE)
        self.pages = p.map_ioreq_pages(sid, vcpus)
        self.ioreq = self.pages.ioreq
        if len(self.ioreq) < vcpus * IOREQ_SIZE:
            raise XenError(
                errno.EINVAL,
                f"the ioreq mapping has {len(self.ioreq)} bytes, {vcpus} vCPUs need "
                f"{vcpus * IOREQ_SIZE}",
            )
        self.bufioreq = self.pages.bufioreq
        p.map_pcidev(sid, *self.sbdf)
        self.pcidev_mapped = True
        return sid

    def enable(self) -> None:
        """Enable the server, then bind each vCPU's port, which Xen writes only at enable."""
        p = self.platform
        assert self.server_id is not None
        p.set_ioreq_server_state(self.server_id, True)
        self.enabled = True
        for vcpu in range(self.vcpus):
            remote = read_slot(self.ioreq, vcpu).vp_eport
            if remote == 0:
                raise XenError(
                    errno.EINVAL,
                    f"Xen wrote no event channel port into vCPU {vcpu}'s slot after enabling",
                )
            self.vcpu_port.append(p.evtchn_bind(remote))
        remote_buf = p.bufioreq_port(self.server_id)
        if remote_buf is not None and self.bufioreq is not None:
            self.buf_port = p.evtchn_bind(remote_buf)

    def announce(self, state_key: str) -> None:
        """Tell the toolstack the server is ready (after `enable`: the key goes last)."""
        p = self.platform
        assert self.server_id is not None and self.enabled
        p.xenstore_write(state_key, "running")
        self.state_key = state_key
        seg, bus, dev, fn = self.sbdf
        log.info(
            "ioreq server %d for domain %d: %d vCPU(s), PCI %04x:%02x:%02x.%x%s",
            self.server_id,
            p.domid,
            self.vcpus,
            seg,
            bus,
            dev,
            fn,
            ", buffered ring" if self.buf_port is not None else "",
        )

    def teardown_steps(self, unclaims: list[Step]) -> list[Step]:
        """Undo everything, in reverse: disable, unbind, then `unclaims` (the BARs' and the
        ports'), the PCI function and the server."""
        p = self.platform
        steps: list[Step] = []
        if self.state_key is not None:
            key = self.state_key
            steps.append(("remove the xenstore key", lambda: p.xenstore_remove(key)))
        sid = self.server_id
        if sid is not None and self.enabled:
            steps.append(("disable the server", lambda: p.set_ioreq_server_state(sid, False)))
        for port in [*self.vcpu_port, *([self.buf_port] if self.buf_port is not None else [])]:
            steps.append((f"unbind port {port}", partial(p.evtchn_unbind, port)))
        if sid is not None:
            steps.extend(unclaims)
            if self.pcidev_mapped:
                steps.append(("unclaim the PCI function", lambda: p.unmap_pcidev(sid, *self.sbdf)))
            steps.append(("destroy the server", lambda: p.destroy_ioreq_server(sid)))
        if self.pages is not None:
            steps.append(("unmap the ioreq pages", self.pages.close))
        steps.append(("close the Xen handles", p.close))
        return steps

    def closed(self) -> None:
        """After teardown: nothing held any more."""
        self.enabled = False
        self.ioreq = bytearray()
        self.bufioreq = None
