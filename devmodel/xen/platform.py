"""The contract between the Xen transport and the host it runs on.

Why a contract: these machines have no Xen hypervisor, so the same dispatch loop must run
against a simulated hypervisor in tests and against Xen's tool libraries (libxendevicemodel,
libxenforeignmemory, libxenevtchn, libxenstore) in production. Every method maps onto one
library call or a small group of them (shared/reference/xen-ioreq.md); failures raise
`XenError` carrying the errno the library reported.
"""

from __future__ import annotations

from typing import Final, Protocol

DEVICE_MODEL_STATE: Final = "/local/domain/0/device-model/{domid}/state"
"""libxl's readiness key of the guest's own device model (QEMU writes `running` there)."""


class XenError(OSError):
    """A Xen host operation failed; `errno` is what the library reported."""


class IoreqPages(Protocol):
    """The ioreq server's pages, mapped into the device model (as a resource)."""

    @property
    def ioreq(self) -> memoryview:
        """The synchronous page: one 32-byte `ioreq_t` slot per vCPU, writable."""

    @property
    def bufioreq(self) -> memoryview | None:
        """The buffered page (ring of posted writes), or None if the server has none."""

    def close(self) -> None:
        """Unmap both pages; the memoryviews must not be used afterwards."""


class GuestMapping(Protocol):
    """Guest frames mapped for a data_is_ptr access (never frames of lent memory)."""

    @property
    def view(self) -> memoryview:
        """The mapped frames, contiguous, `len(frames) * 4096` bytes."""

    def close(self) -> None:
        """Unmap the frames."""


class XenPlatform(Protocol):
    """One guest's view of the host: what an ioreq server for `domid` may do.

    Handles are opened by whoever builds the platform; `restrict()` then limits them to the
    guest (deprivileging). Event-channel ports here are local ports unless named `remote`.
    """

    domid: int

    # --- libxendevicemodel ----------------------------------------------------------------
    def restrict(self) -> None:
        """Limit every handle to `domid` (xendevicemodel_restrict and friends)."""

    def create_ioreq_server(self, handle_bufioreq: int) -> int:
        """Create a server (HVM_IOREQSRV_BUFIOREQ_* mode); returns its ioservid."""

    def destroy_ioreq_server(self, server: int) -> None: ...

    def set_ioreq_server_state(self, server: int, enabled: bool) -> None: ...

    def bufioreq_port(self, server: int) -> int | None:
        """The remote event-channel port of the buffered page (get_ioreq_server_info)."""

    def map_io_range(self, server: int, is_mmio: bool, start: int, end: int) -> None:
        """Claim [start, end] (inclusive) of MMIO (or port I/O) space for `server`."""

    def unmap_io_range(self, server: int, is_mmio: bool, start: int, end: int) -> None: ...

    def map_pcidev(self, server: int, segment: int, bus: int, device: int, function: int) -> None:
        """Claim the config cycles of one PCI function."""

    def unmap_pcidev(
        self, server: int, segment: int, bus: int, device: int, function: int
    ) -> None: ...

    def inject_msi(self, address: int, data: int) -> None: ...

    def set_pci_intx_level(
        self, segment: int, bus: int, device: int, intx: int, level: int
    ) -> None: ...

    def vcpu_count(self) -> int:
        """How many vCPUs the guest may have (the number of slots to serve)."""

    # --- libxenforeignmemory --------------------------------------------------------------
    def map_ioreq_pages(self, server: int, vcpus: int) -> IoreqPages:
        """Map the server's pages as a resource (XENMEM_resource_ioreq_server)."""

    def map_guest(self, frames: list[int], writable: bool) -> GuestMapping:
        """Map guest frames (gfns) for a data_is_ptr access."""

    # --- libxenevtchn ---------------------------------------------------------------------
    def evtchn_fd(self) -> int:
        """Readable when a port is pending."""

    def evtchn_bind(self, remote_port: int) -> int:
        """Bind an interdomain port of the guest; returns the local port."""

    def evtchn_unbind(self, local_port: int) -> None: ...

    def evtchn_pending(self) -> int | None:
        """The next pending local port (masked until unmasked), or None if none is."""

    def evtchn_unmask(self, local_port: int) -> None: ...

    def evtchn_notify(self, local_port: int) -> None: ...

    # --- xenstore -------------------------------------------------------------------------
    def xenstore_write(self, path: str, value: str) -> None: ...

    def xenstore_read(self, path: str) -> str | None: ...

    def xenstore_remove(self, path: str) -> None: ...

    def has_device_model(self) -> bool:
        """Whether the guest has a device model of its own (QEMU for an HVM guest), which
        answers what no other ioreq server claims. libxl writes DEVICE_MODEL_STATE for it
        (the key exists once QEMU has started); a PVH guest has none."""

    def watch_domain_end(self) -> int:
        """Start watching xenstore's `@releaseDomain` (fired whenever any domain is gone);
        returns an fd that is readable when a watch event is pending."""

    def domain_ended(self) -> bool:
        """Consume the pending watch events; whether the guest `domid` is gone."""

    def close(self) -> None:
        """Close every handle (after the transport has destroyed its server)."""
