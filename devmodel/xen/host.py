"""The real XenPlatform: one guest's ioreq server host, on Xen's tool libraries (libs.py).

Only dom0 (or a driver domain with the right XSM labels) can open these handles, and nothing
here runs without a hypervisor: the tests check the bindings against the headers, run this
class against a fake build of the libraries (tests/xen/c/fake_xenlibs.c), and check that on a
machine without /dev/xen it fails with a XenError instead of crashing.

Deprivileging: `restrict()` limits the device-model, foreign-memory and event-channel handles
to the guest, one handle at a time. It deliberately does not use xentoolcore_restrict_all,
which would also neutralise the xenstore connection (xenstore cannot be restricted per
domain), and the device model still needs xenstore to report readiness.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any, Final

from devmodel.xen import libs
from devmodel.xen.platform import DEVICE_MODEL_STATE, XenError
from devmodel_wire.xen.ioreq import (
    FRAME_BUFIOREQ,
    PAGE_SIZE,
    SLOTS_PER_PAGE,
    XENMEM_RESOURCE_IOREQ_SERVER,
    BufioreqMode,
    frame_ioreq,
)

_RW: Final = libs.PROT_READ | libs.PROT_WRITE
RELEASE_DOMAIN: Final = b"@releaseDomain"
"""xenstore's special watch path: fired whenever a domain is released (gone for good)."""
WATCH_TOKEN: Final = b"devmodel"


def _view(address: int, size: int, *, writable: bool = True) -> memoryview:
    """A byte memoryview over `size` bytes of mapped memory at `address` (no copy)."""
    view = memoryview((ctypes.c_char * size).from_address(address)).cast("B")
    return view if writable else view.toreadonly()


class ResourcePages:
    """The pages of one ioreq server, mapped in one piece as a resource.

    With a buffered page, frame 0 (buffered) and frames 1.. (synchronous) are mapped together,
    so `bufioreq` is the first page and `ioreq` the rest; without one, only the synchronous
    frames are mapped.
    """

    def __init__(
        self, host: XenHost, handle: Any, address: int, pages: int, buffered: bool
    ) -> None:
        self._host = host
        self._handle = handle
        self._whole: memoryview | None = _view(address, pages * PAGE_SIZE)
        self._ioreq = self._whole[PAGE_SIZE:] if buffered else self._whole
        self._bufioreq = self._whole[:PAGE_SIZE] if buffered else None
        self.address = address
        self.pages = pages

    @property
    def ioreq(self) -> memoryview:
        return self._ioreq

    @property
    def bufioreq(self) -> memoryview | None:
        return self._bufioreq

    def close(self) -> None:
        """Unmap. Views taken from `ioreq`/`bufioreq` must be gone: they would point at
        unmapped memory (ctypes cannot stop a stale one from faulting)."""
        if self._whole is None:
            return
        for view in (self._ioreq, self._bufioreq, self._whole):
            if view is not None:
                view.release()
        self._whole = None
        self._host._call(libs.FOREIGNMEMORY, "xenforeignmemory_unmap_resource", self._handle)


class GuestFrames:
    """Guest frames mapped with xenforeignmemory_map, contiguous in the device model."""

    def __init__(self, host: XenHost, address: int, count: int, writable: bool) -> None:
        self._host = host
        self._address: int | None = address
        self._count = count
        self._view = _view(address, count * PAGE_SIZE, writable=writable)

    @property
    def view(self) -> memoryview:
        return self._view

    def close(self) -> None:
        if self._address is None:
            return
        self._view.release()
        address, self._address = self._address, None
        self._host._call(
            libs.FOREIGNMEMORY, "xenforeignmemory_unmap", address, ctypes.c_size_t(self._count)
        )


class XenHost:
    """XenPlatform on the real libraries, for guest `domid`.

    The constructor opens the four handles (or closes what it opened and raises XenError);
    `close()` closes them. The event-channel fd is made non-blocking so `evtchn_pending()` can
    answer None instead of blocking the event loop.
    """

    def __init__(
        self,
        domid: int,
        *,
        devicemodel: libs.Library = libs.DEVICEMODEL,
        foreignmemory: libs.Library = libs.FOREIGNMEMORY,
        evtchn: libs.Library = libs.EVTCHN,
        xenstore: libs.Library = libs.XENSTORE,
        libc: libs.Library = libs.LIBC,
    ) -> None:
        if not 0 <= domid < 0x7FF0:  # DOMID_FIRST_RESERVED: above are special domains
            raise ValueError(f"domid {domid} is not a guest's")
        self.domid = domid
        self._libs = {
            libs.DEVICEMODEL.soname: devicemodel,
            libs.FOREIGNMEMORY.soname: foreignmemory,
            libs.EVTCHN.soname: evtchn,
            libs.XENSTORE.soname: xenstore,
            libs.LIBC.soname: libc,
        }
        self._servers: dict[int, int] = {}  # ioservid -> HVM_IOREQSRV_BUFIOREQ_* mode
        self._dmod: Any = None
        self._fmem: Any = None
        self._xce: Any = None
        self._xsh: Any = None
        try:
            self._dmod = self._open(libs.DEVICEMODEL, "xendevicemodel_open", None, 0)
            self._fmem = self._open(libs.FOREIGNMEMORY, "xenforeignmemory_open", None, 0)
            self._xce = self._open(libs.EVTCHN, "xenevtchn_open", None, 0)
            self._xsh = self._open(libs.XENSTORE, "xs_open", 0)
            os.set_blocking(self.evtchn_fd(), False)
        except BaseException:
            self.close()
            raise

    # --- plumbing --------------------------------------------------------------------------
    def _fn(self, lib: libs.Library, name: str) -> Any:
        return self._libs[lib.soname].fn(name)

    def _call(self, lib: libs.Library, name: str, *args: Any) -> Any:
        handle = {
            libs.DEVICEMODEL.soname: self._dmod,
            libs.FOREIGNMEMORY.soname: self._fmem,
            libs.EVTCHN.soname: self._xce,
            libs.XENSTORE.soname: self._xsh,
        }[lib.soname]
        if handle is None:
            raise XenError(errno.EBADF, f"{name}: the Xen host for domain {self.domid} is closed")
        return self._fn(lib, name)(handle, *args)

    def _open(self, lib: libs.Library, name: str, *args: Any) -> Any:
        try:
            return self._fn(lib, name)(*args)
        except XenError as exc:
            err = exc.errno or errno.EIO
            hint = " (no /dev/xen: is this a Xen dom0?)" if not os.path.exists("/dev/xen") else ""
            raise XenError(
                err, f"cannot open a {lib.soname} handle ({name}): {os.strerror(err)}{hint}"
            ) from None

    # --- libxendevicemodel ---------------------------------------------------------------
    def restrict(self) -> None:
        domid = self.domid
        self._call(libs.DEVICEMODEL, "xendevicemodel_restrict", domid)
        self._call(libs.FOREIGNMEMORY, "xenforeignmemory_restrict", domid)
        self._call(libs.EVTCHN, "xenevtchn_restrict", domid)

    def create_ioreq_server(self, handle_bufioreq: int) -> int:
        mode = BufioreqMode(handle_bufioreq)
        server = libs.ioservid_t()
        self._call(
            libs.DEVICEMODEL,
            "xendevicemodel_create_ioreq_server",
            self.domid,
            int(mode),
            ctypes.byref(server),
        )
        self._servers[server.value] = mode
        return int(server.value)

    def destroy_ioreq_server(self, server: int) -> None:
        self._call(libs.DEVICEMODEL, "xendevicemodel_destroy_ioreq_server", self.domid, server)
        self._servers.pop(server, None)

    def set_ioreq_server_state(self, server: int, enabled: bool) -> None:
        self._call(
            libs.DEVICEMODEL,
            "xendevicemodel_set_ioreq_server_state",
            self.domid,
            server,
            int(enabled),
        )

    def bufioreq_port(self, server: int) -> int | None:
        if self._servers.get(server) == BufioreqMode.OFF:
            return None
        port = libs.evtchn_port_t()
        # NULL gfns: the pages are mapped as a resource, not through the guest's p2m.
        self._call(
            libs.DEVICEMODEL,
            "xendevicemodel_get_ioreq_server_info",
            self.domid,
            server,
            None,
            None,
            ctypes.byref(port),
        )
        return int(port.value)

    def map_io_range(self, server: int, is_mmio: bool, start: int, end: int) -> None:
        self._range("xendevicemodel_map_io_range_to_ioreq_server", server, is_mmio, start, end)

    def unmap_io_range(self, server: int, is_mmio: bool, start: int, end: int) -> None:
        self._range("xendevicemodel_unmap_io_range_from_ioreq_server", server, is_mmio, start, end)

    def _range(self, name: str, server: int, is_mmio: bool, start: int, end: int) -> None:
        if not 0 <= start <= end < 1 << 64:
            raise ValueError(f"bad range [{start:#x}, {end:#x}] (the end is inclusive)")
        self._call(libs.DEVICEMODEL, name, self.domid, server, int(is_mmio), start, end)

    def map_pcidev(self, server: int, segment: int, bus: int, device: int, function: int) -> None:
        self._pcidev(
            "xendevicemodel_map_pcidev_to_ioreq_server", server, segment, bus, device, function
        )

    def unmap_pcidev(self, server: int, segment: int, bus: int, device: int, function: int) -> None:
        self._pcidev(
            "xendevicemodel_unmap_pcidev_from_ioreq_server", server, segment, bus, device, function
        )

    def _pcidev(
        self, name: str, server: int, segment: int, bus: int, device: int, function: int
    ) -> None:
        # ctypes would silently truncate an out-of-range u8: check like dm_op_sbdf does.
        if not (0 <= segment <= 0xFFFF and 0 <= bus <= 0xFF and 0 <= device < 32):
            raise ValueError(f"bad PCI address {segment:04x}:{bus:02x}:{device:02x}")
        if not 0 <= function < 8:
            raise ValueError(f"bad PCI function {function}")
        self._call(libs.DEVICEMODEL, name, self.domid, server, segment, bus, device, function)

    def inject_msi(self, address: int, data: int) -> None:
        if not (0 <= address < 1 << 64 and 0 <= data < 1 << 32):
            raise ValueError(f"bad MSI address {address:#x} / data {data:#x}")
        self._call(libs.DEVICEMODEL, "xendevicemodel_inject_msi", self.domid, address, data)

    def set_pci_intx_level(
        self, segment: int, bus: int, device: int, intx: int, level: int
    ) -> None:
        if not (0 <= segment <= 0xFFFF and 0 <= bus <= 0xFF and 0 <= device < 32):
            raise ValueError(f"bad PCI address {segment:04x}:{bus:02x}:{device:02x}")
        if not (0 <= intx < 4 and level in (0, 1)):
            raise ValueError(f"bad INTx pin {intx} or level {level}")
        self._call(
            libs.DEVICEMODEL,
            "xendevicemodel_set_pci_intx_level",
            self.domid,
            segment,
            bus,
            device,
            intx,
            level,
        )

    def vcpu_count(self) -> int:
        """XEN_DMOP_nr_vcpus (what varstored and demu ask), else libxl's xenstore record.

        The dm_op answers the maximum the guest was built with, which is the number of slots
        Xen may use. The fallback counts /local/domain/<domid>/cpu/<n>, which libxl writes for
        every possible vCPU (online or not).
        """
        count = ctypes.c_uint()
        try:
            self._call(libs.DEVICEMODEL, "xendevicemodel_nr_vcpus", self.domid, ctypes.byref(count))
        except XenError as first:
            try:
                cpus = self.xenstore_directory(f"/local/domain/{self.domid}/cpu")
            except XenError:
                cpus = []
            if not cpus:
                raise first from None
            return len(cpus)
        return int(count.value)

    # --- libxenforeignmemory --------------------------------------------------------------
    def map_ioreq_pages(self, server: int, vcpus: int) -> ResourcePages:
        """Frame 0 (buffered, unless the server was created without) and the synchronous
        frames, in one mapping. Xen 4.17 gives a server exactly one synchronous page (HVM
        guests have at most 128 vCPUs), so asking for more than 128 vCPUs fails in Xen with
        EINVAL rather than here: the ABI numbers frames for more, and a later Xen may have
        them."""
        if vcpus < 1:
            raise ValueError(f"{vcpus} vCPUs")
        sync_pages = -(-vcpus // SLOTS_PER_PAGE)
        buffered = self._servers.get(server, BufioreqMode.LEGACY) != BufioreqMode.OFF
        first = FRAME_BUFIOREQ if buffered else frame_ioreq(0)
        count = sync_pages + (1 if buffered else 0)
        address = ctypes.c_void_p(None)  # let the kernel choose
        handle = self._call(
            libs.FOREIGNMEMORY,
            "xenforeignmemory_map_resource",
            self.domid,
            XENMEM_RESOURCE_IOREQ_SERVER,
            server,
            first,
            count,
            ctypes.byref(address),
            _RW,
            0,
        )
        if not address.value:
            self._call(libs.FOREIGNMEMORY, "xenforeignmemory_unmap_resource", handle)
            raise XenError(errno.EFAULT, "xenforeignmemory_map_resource returned no address")
        return ResourcePages(self, handle, address.value, count, buffered)

    def map_guest(self, frames: list[int], writable: bool) -> GuestFrames:
        if not frames:
            raise ValueError("no frames to map")
        if not all(0 <= gfn < 1 << 64 for gfn in frames):
            raise ValueError("a guest frame number is not a 64-bit value")  # ctypes would wrap
        n = len(frames)
        gfns = (libs.xen_pfn_t * n)(*frames)
        errs = (ctypes.c_int * n)()
        prot = _RW if writable else libs.PROT_READ
        address = self._call(
            libs.FOREIGNMEMORY, "xenforeignmemory_map", self.domid, prot, n, gfns, errs
        )
        mapping = GuestFrames(self, int(address), n, writable)
        bad = [(frames[i], -errs[i]) for i in range(n) if errs[i]]
        if bad:
            mapping.close()
            gfn, err = bad[0]
            raise XenError(
                err, f"cannot map guest frame {gfn:#x} of domain {self.domid}: {os.strerror(err)}"
            )
        return mapping

    # --- libxenevtchn ---------------------------------------------------------------------
    def evtchn_fd(self) -> int:
        return int(self._call(libs.EVTCHN, "xenevtchn_fd"))

    def evtchn_bind(self, remote_port: int) -> int:
        if not 0 <= remote_port < 1 << 32:
            raise ValueError(f"event channel port {remote_port}")
        return int(self._call(libs.EVTCHN, "xenevtchn_bind_interdomain", self.domid, remote_port))

    def evtchn_unbind(self, local_port: int) -> None:
        self._call(libs.EVTCHN, "xenevtchn_unbind", local_port)

    def evtchn_pending(self) -> int | None:
        try:
            return int(self._call(libs.EVTCHN, "xenevtchn_pending"))
        except XenError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return None
            raise

    def evtchn_unmask(self, local_port: int) -> None:
        self._call(libs.EVTCHN, "xenevtchn_unmask", local_port)

    def evtchn_notify(self, local_port: int) -> None:
        self._call(libs.EVTCHN, "xenevtchn_notify", local_port)

    # --- xenstore -------------------------------------------------------------------------
    def xenstore_write(self, path: str, value: str) -> None:
        data = value.encode()
        self._call(libs.XENSTORE, "xs_write", libs.XBT_NULL, path.encode(), data, len(data))

    def xenstore_read(self, path: str) -> str | None:
        length = ctypes.c_uint()
        try:
            raw = self._call(
                libs.XENSTORE, "xs_read", libs.XBT_NULL, path.encode(), ctypes.byref(length)
            )
        except XenError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        try:
            return ctypes.string_at(raw, length.value).decode()
        finally:
            self._fn(libs.LIBC, "free")(raw)

    def has_device_model(self) -> bool:
        """libxl's readiness key for the guest's device model (QEMU) exists."""
        return self.xenstore_read(DEVICE_MODEL_STATE.format(domid=self.domid)) is not None

    def xenstore_remove(self, path: str) -> None:
        """Remove `path` and its children; a path that is already gone is not an error."""
        try:
            self._call(libs.XENSTORE, "xs_rm", libs.XBT_NULL, path.encode())
        except XenError as exc:
            if exc.errno != errno.ENOENT:
                raise

    def xenstore_directory(self, path: str) -> list[str]:
        """The children of `path` ([] if it does not exist)."""
        num = ctypes.c_uint()
        try:
            names = self._call(
                libs.XENSTORE, "xs_directory", libs.XBT_NULL, path.encode(), ctypes.byref(num)
            )
        except XenError as exc:
            if exc.errno == errno.ENOENT:
                return []
            raise
        try:
            return [bytes(names[i]).decode() for i in range(num.value)]
        finally:
            self._fn(libs.LIBC, "free")(ctypes.cast(names, ctypes.c_void_p))

    def watch_domain_end(self) -> int:
        """xs_watch on `@releaseDomain`; the fd is libxenstore's watch pipe (xs_fileno)."""
        self._call(libs.XENSTORE, "xs_watch", RELEASE_DOMAIN, WATCH_TOKEN)
        fd: int = self._call(libs.XENSTORE, "xs_fileno")
        return fd

    def domain_ended(self) -> bool:
        """Drains the watch events (xs_check_watch until EAGAIN), then asks xenstored whether
        the domain is still introduced: it stops being so when the domain is released, the
        moment @releaseDomain fires for it.

        xs_is_domain_introduced also says false when its request failed (errno set); then the
        guest's xenstore directory, which libxl removes on destroy, decides, so that a failed
        request alone never stops a guest's device model."""
        check = self._fn(libs.XENSTORE, "xs_check_watch")
        free = self._fn(libs.LIBC, "free")
        while True:
            ctypes.set_errno(0)
            vec = self._call(libs.XENSTORE, "xs_check_watch")
            if not vec:
                err = ctypes.get_errno()
                if err not in (0, errno.EAGAIN):
                    raise XenError(err, f"{check.__name__}: {os.strerror(err)}")
                break
            free(ctypes.cast(vec, ctypes.c_void_p))
        ctypes.set_errno(0)
        if self._call(libs.XENSTORE, "xs_is_domain_introduced", self.domid):
            return False
        if ctypes.get_errno() == 0:
            return True
        return not self.xenstore_directory(f"/local/domain/{self.domid}")

    def __enter__(self) -> XenHost:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every handle that is open (safe to call twice)."""
        closers = [
            (libs.XENSTORE, "xs_close", "_xsh"),
            (libs.EVTCHN, "xenevtchn_close", "_xce"),
            (libs.FOREIGNMEMORY, "xenforeignmemory_close", "_fmem"),
            (libs.DEVICEMODEL, "xendevicemodel_close", "_dmod"),
        ]
        failure: XenError | None = None
        for lib, name, attr in closers:
            handle = getattr(self, attr)
            if handle is None:
                continue
            setattr(self, attr, None)
            try:
                self._fn(lib, name)(handle)
            except XenError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
