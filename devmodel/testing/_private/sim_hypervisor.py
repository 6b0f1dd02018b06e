"""A simulated Xen hypervisor: a `XenPlatform` the transport cannot tell from a host.

What is real: the shared pages (4096-byte buffers laid out by devmodel_wire.xen, which is checked
against Xen's headers), the event channel's file descriptor (a pipe the transport's trio loop
really waits on), guest RAM (one buffer that data_is_ptr accesses map live), and the routing
Xen does before any request reaches a server: an MMIO access goes to this server only if its
whole range lies in a claimed range of an enabled server, a config cycle only if its function
was claimed; everything else goes to the "default device model" (the sim answers all-ones and
records it, as QEMU answers an unassigned address).

The guest side is `SimVcpu`: each access writes the vCPU's slot as Xen does (state last),
notifies the server's port, and waits (async, in the test's trio tasks) until the server
notifies back with IORESP_READY. A vCPU has one access in flight at a time, as a real one is
blocked until its answer.

As on Xen 4.20: the ioreq page is zero until the server is enabled (each slot's `vp_eport` is
written at enable, so binding a port earlier fails with EINVAL), the first request after enable
is an IOREQ_TYPE_INVALIDATE with count 0, and after `destroy_domain` (`xl destroy`) every call
on the server fails with ENOENT.

A PVH guest's ACPI tables as libxl lays them out (`add_libxl_acpi`): RAM pages at 0xFC000000
(the acpi_info page, then the tables) and an RSDP either after them or at 0xFFFC0.

Fault injection: `vcpus` larger than a page's slots, raw slots (any IoReq, or any 32 bytes),
posted writes of any kind, raw bytes in the buffered ring, failing platform calls (`fail`).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections import deque
from dataclasses import dataclass, field, replace

import trio

from devmodel.xen.platform import XenError
from devmodel_wire.acpi import encode_table
from devmodel_wire.xen import (
    IOREQ_READ,
    IOREQ_WRITE,
    PAGE_SIZE,
    BufioreqMode,
    IoReq,
    IoreqState,
    IoreqType,
    encode_pci_config_addr,
    post_buffered_write,
    read_slot,
    set_slot_state,
    slot_offset,
    write_slot,
)

REMOTE_PORT_BASE = 40
"""The guest-side port of vCPU n's channel is REMOTE_PORT_BASE + n (Xen picks any free one)."""
REMOTE_BUF_PORT = 39


def ones(size: int) -> int:
    return (1 << (8 * size)) - 1


@dataclass
class SimServer:
    id: int
    mode: int
    ioreq: bytearray
    bufioreq: bytearray | None
    enabled: bool = False
    mmio: list[tuple[int, int]] = field(default_factory=list)
    pio: list[tuple[int, int]] = field(default_factory=list)
    pcidevs: set[tuple[int, int, int, int]] = field(default_factory=set)
    destroyed: bool = False


class SimPages:
    def __init__(self, sim: SimHypervisor, server: SimServer) -> None:
        self.sim = sim
        self._ioreq = memoryview(server.ioreq)
        self._buf = memoryview(server.bufioreq) if server.bufioreq is not None else None
        self.closed = False

    @property
    def ioreq(self) -> memoryview:
        return self._ioreq

    @property
    def bufioreq(self) -> memoryview | None:
        return self._buf

    def close(self) -> None:
        self.closed = True
        self._ioreq.release()
        if self._buf is not None:
            self._buf.release()
        self.sim.pages_open -= 1


class SimMapping:
    def __init__(self, sim: SimHypervisor, view: memoryview) -> None:
        self.sim = sim
        self._view = view
        sim.mappings_open += 1

    @property
    def view(self) -> memoryview:
        return self._view

    def close(self) -> None:
        self._view.release()
        self.sim.mappings_open -= 1


class SimHypervisor:
    """One HVM guest `domid` with `vcpus` vCPUs and `ram` bytes of RAM at address 0."""

    def __init__(
        self, domid: int = 7, vcpus: int = 2, ram: int = 1 << 20, *, device_model: bool = True
    ) -> None:
        """`device_model`: the guest has QEMU beside this server (an HVM guest); False for a
        PVH guest, where nobody else answers port I/O or config cycles."""
        self.domid = domid
        self.device_model = device_model
        self.vcpus = vcpus
        self.ram = bytearray(ram)
        # Guest RAM by guest-physical base: low RAM at 0, and whatever `add_ram` adds.
        self.ram_regions: dict[int, bytearray] = {0: self.ram}
        self.servers: dict[int, SimServer] = {}
        self.next_server = 1
        self.restricted = False
        self.closed = False
        self.xenstore: dict[str, str] = {}
        self.pages_open = 0
        self.mappings_open = 0
        self.mapped_frames: list[list[int]] = []
        # Calls by name that raise XenError(errno) instead of doing anything.
        self.fail: dict[str, int] = {}
        self.calls: list[str] = []
        # Accesses Xen sent to the default device model: (kind, address).
        self.default_accesses: list[tuple[str, int]] = []
        self.msis: list[tuple[int, int]] = []
        # Every set_pci_intx_level: (segment, bus, device, intx pin, level); `intx_level` is
        # the line per (segment, bus, device, pin) as Xen keeps it.
        self.intx_calls: list[tuple[int, int, int, int, int]] = []
        self.intx_level: dict[tuple[int, int, int, int], int] = {}
        # Xen's own latch of the guest's last 4-byte write to port 0xcf8.
        self.pci_cf8 = 0
        # Set when a server is enabled: the next access first broadcasts an INVALIDATE.
        self.invalidate_pending = False
        self.invalidates = 0
        # Event channels. remote port -> local port and back; local ports are per handle.
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.local_of: dict[int, int] = {}
        self.remote_of: dict[int, int] = {}
        self.next_local = 1
        self._ring: deque[int] = deque()  # delivered, not yet read
        self._masked: set[int] = set()  # delivered and not unmasked yet
        self._pending_masked: set[int] = set()  # fired while masked
        self.notified: dict[int, trio.Event] = {}  # remote port -> the vCPU waiting on it
        # xenstore's @releaseDomain watch: a pipe written once per event, as libxenstore's.
        self.released = False
        self._watch: tuple[int, int] | None = None
        self.cpus = [SimVcpu(self, v) for v in range(vcpus)]

    # ------------------------------------------------------------------ helpers

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.closed:
            raise XenError(errno.EBADF, f"{name} after close")
        code = self.fail.get(name)
        if code is not None:
            raise XenError(code, f"{name} failed (injected)")

    def server(self) -> SimServer:
        """The one live server (the tests run one transport per sim)."""
        live = [s for s in self.servers.values() if not s.destroyed]
        assert len(live) == 1, f"{len(live)} live servers"
        return live[0]

    def _get(self, server: int) -> SimServer:
        s = self.servers.get(server)
        if s is None or s.destroyed:
            raise XenError(errno.ENOENT, f"no ioreq server {server}")
        return s

    # ------------------------------------------------------------------ devicemodel

    def restrict(self) -> None:
        self._call("restrict")
        self.restricted = True

    def create_ioreq_server(self, handle_bufioreq: int) -> int:
        self._call("create_ioreq_server")
        if handle_bufioreq not in tuple(BufioreqMode):
            raise XenError(errno.EINVAL, f"bufioreq mode {handle_bufioreq}")
        sid = self.next_server
        self.next_server += 1
        # Xen allocates each vCPU's channel (and the ring's) now, but the page is zeroed: the
        # ports are written into the slots only when the server is enabled (below).
        ioreq = bytearray(PAGE_SIZE)
        buf = bytearray(PAGE_SIZE) if handle_bufioreq != BufioreqMode.OFF else None
        self.servers[sid] = SimServer(sid, handle_bufioreq, ioreq, buf)
        return sid

    def _remote_ports(self) -> set[int]:
        """The guest's ports a device model may bind: those of the live servers."""
        ports: set[int] = set()
        for s in self.servers.values():
            if not s.destroyed:
                ports.update(REMOTE_PORT_BASE + v for v in range(self._slots()))
                if s.bufioreq is not None:
                    ports.add(REMOTE_BUF_PORT)
        return ports

    def _slots(self) -> int:
        return min(self.vcpus, PAGE_SIZE // 32)

    def destroy_ioreq_server(self, server: int) -> None:
        self._call("destroy_ioreq_server")
        self._get(server).destroyed = True

    def set_ioreq_server_state(self, server: int, enabled: bool) -> None:
        """Enabling writes each vCPU's port into its slot, as Xen 4.20's ioreq_server_enable
        (ioreq_update_evtchn) does, and leaves a map-cache invalidation pending: the first
        request a server sees on a real guest is IOREQ_TYPE_INVALIDATE (count 0)."""
        self._call("set_ioreq_server_state")
        s = self._get(server)
        if enabled and not s.enabled:
            for v in range(self._slots()):
                slot = read_slot(s.ioreq, v)
                write_slot(s.ioreq, v, replace(slot, vp_eport=REMOTE_PORT_BASE + v))
            self.invalidate_pending = True
        s.enabled = enabled

    def destroy_domain(self) -> None:
        """`xl destroy`: Xen destroys the guest's ioreq servers with it; calls on them then
        fail with ENOENT. xenstored then releases the domain: @releaseDomain fires."""
        for s in self.servers.values():
            s.destroyed = True
            s.enabled = False
        self.released = True
        self.fire_release_watch()

    def fire_release_watch(self) -> None:
        """One @releaseDomain event (another domain's end fires it too)."""
        if self._watch is not None:
            os.write(self._watch[1], b"\0")

    def bufioreq_port(self, server: int) -> int | None:
        self._call("bufioreq_port")
        return REMOTE_BUF_PORT if self._get(server).bufioreq is not None else None

    def map_io_range(self, server: int, is_mmio: bool, start: int, end: int) -> None:
        self._call("map_io_range")
        s = self._get(server)
        ranges = s.mmio if is_mmio else s.pio
        if end < start or any(a <= end and start <= b for a, b in ranges):
            raise XenError(errno.EEXIST, f"range {start:#x}-{end:#x} overlaps")
        ranges.append((start, end))

    def unmap_io_range(self, server: int, is_mmio: bool, start: int, end: int) -> None:
        self._call("unmap_io_range")
        s = self._get(server)
        ranges = s.mmio if is_mmio else s.pio
        if (start, end) not in ranges:
            raise XenError(errno.ENOENT, f"range {start:#x}-{end:#x} not claimed")
        ranges.remove((start, end))

    def map_pcidev(self, server: int, segment: int, bus: int, device: int, function: int) -> None:
        self._call("map_pcidev")
        self._get(server).pcidevs.add((segment, bus, device, function))

    def unmap_pcidev(self, server: int, segment: int, bus: int, device: int, function: int) -> None:
        self._call("unmap_pcidev")
        self._get(server).pcidevs.discard((segment, bus, device, function))

    def inject_msi(self, address: int, data: int) -> None:
        self._call("inject_msi")
        self.msis.append((address, data))

    def set_pci_intx_level(
        self, segment: int, bus: int, device: int, intx: int, level: int
    ) -> None:
        self._call("set_pci_intx_level")
        if not (0 <= intx < 4 and level in (0, 1)):
            raise ValueError(f"bad INTx pin {intx} or level {level}")
        self.intx_calls.append((segment, bus, device, intx, level))
        self.intx_level[(segment, bus, device, intx)] = level

    def vcpu_count(self) -> int:
        self._call("vcpu_count")
        return self.vcpus

    # ------------------------------------------------------------------ foreignmemory

    def map_ioreq_pages(self, server: int, vcpus: int) -> SimPages:
        self._call("map_ioreq_pages")
        self.pages_open += 1
        return SimPages(self, self._get(server))

    def map_guest(self, frames: list[int], writable: bool) -> SimMapping:
        self._call("map_guest")
        if not frames or frames != list(range(frames[0], frames[0] + len(frames))):
            raise XenError(errno.EINVAL, f"frames {frames} are not contiguous")
        start, end = frames[0] * PAGE_SIZE, (frames[-1] + 1) * PAGE_SIZE
        for base, region in self.ram_regions.items():
            if base <= start and end <= base + len(region):
                break
        else:
            # Not RAM: MMIO (BARs, lent memory) or nothing. Foreign maps of it fail.
            raise XenError(errno.EFAULT, f"frames {frames[0]:#x}.. are not guest RAM")
        self.mapped_frames.append(list(frames))
        view = memoryview(region)[start - base : end - base]
        return SimMapping(self, view if writable else view.toreadonly())

    def add_ram(self, base: int, size: int) -> bytearray:
        """Populate [base, base + size) (page-aligned) with zeroed guest RAM; returns it."""
        assert base % PAGE_SIZE == 0 and size % PAGE_SIZE == 0
        region = self.ram_regions[base] = bytearray(size)
        return region

    def ram_at(self, address: int, length: int) -> memoryview:
        """Guest RAM at `address` (live), as a test reads or corrupts it."""
        for base, region in self.ram_regions.items():
            if base <= address and address + length <= base + len(region):
                return memoryview(region)[address - base : address - base + length]
        raise ValueError(f"{address:#x} is not guest RAM")

    def add_libxl_acpi(self, *, rsdp_low: bool = False, rsdt: bool = True) -> dict[str, int]:
        """The tables libxl builds for a PVH guest (libxl_x86_acpi.c, libacpi): the acpi_info
        page at 0xFC000000, then FACS, DSDT, FADT, MADT, RSDT and XSDT in the pages after it,
        and a revision 2 RSDP at the start of the page after the tables, or at 0xFFFC0 (what
        libxl does for Linux kernels that do not read `hvm_start_info.rsdp_paddr`).
        Returns each one's address by signature ("RSDP", "XSDT", ...)."""
        info = 0xFC000000
        region = self.add_ram(info, 4 * PAGE_SIZE)
        at = {"FACS": info + 0x1000, "DSDT": info + 0x1040}
        tables = {
            "FACS": b"FACS" + (64).to_bytes(4, "little") + bytes(56),
            "DSDT": encode_table(b"DSDT", b"\x10\x06\\_SB_", revision=2, oem_id=b"Xen   "),
        }
        fadt_body = bytearray(276 - 36)
        fadt_body[0:4] = at["FACS"].to_bytes(4, "little")
        fadt_body[4:8] = at["DSDT"].to_bytes(4, "little")
        at["FADT"] = info + 0x1100
        tables["FADT"] = encode_table(b"FACP", bytes(fadt_body), revision=5, oem_id=b"Xen   ")
        at["APIC"] = info + 0x1300
        tables["APIC"] = encode_table(b"APIC", bytes(8), revision=2, oem_id=b"Xen   ")
        listed = [at["FADT"], at["APIC"]]
        at["XSDT"] = info + 0x1400
        tables["XSDT"] = encode_table(
            b"XSDT",
            b"".join(a.to_bytes(8, "little") for a in listed),
            revision=1,
            oem_id=b"Xen   ",
            oem_table_id=b"HVM     ",
        )
        if rsdt:
            at["RSDT"] = info + 0x1480
            tables["RSDT"] = encode_table(
                b"RSDT",
                b"".join(a.to_bytes(4, "little") for a in listed),
                revision=1,
                oem_id=b"Xen   ",
                oem_table_id=b"HVM     ",
            )
        for name, data in tables.items():
            off = at[name] - info
            region[off : off + len(data)] = data
        rsdp = bytearray(36)
        rsdp[0:8] = b"RSD PTR "
        rsdp[9:15] = b"Xen   "
        rsdp[15] = 2
        rsdp[16:20] = at.get("RSDT", 0).to_bytes(4, "little")
        rsdp[20:24] = (36).to_bytes(4, "little")
        rsdp[24:32] = at["XSDT"].to_bytes(8, "little")
        rsdp[8] = -sum(rsdp[:20]) & 0xFF
        rsdp[32] = -sum(rsdp) & 0xFF
        at["RSDP"] = 0x100000 - 64 if rsdp_low else info + 0x2000
        self.ram_at(at["RSDP"], 36)[:] = rsdp
        return at

    # ------------------------------------------------------------------ evtchn

    def evtchn_fd(self) -> int:
        self._call("evtchn_fd")
        return self._rfd

    def evtchn_bind(self, remote_port: int) -> int:
        self._call("evtchn_bind")
        if remote_port not in self._remote_ports():
            # Xen's evtchn_bind_interdomain: the remote port must be an unbound port the
            # guest's domain allocated for us (port 0 never is).
            raise XenError(errno.EINVAL, f"xenevtchn_bind_interdomain: port {remote_port}")
        if remote_port in self.local_of:
            raise XenError(errno.EBUSY, f"port {remote_port} already bound")
        local = self.next_local
        self.next_local += 1
        self.local_of[remote_port] = local
        self.remote_of[local] = remote_port
        return local

    def evtchn_unbind(self, local_port: int) -> None:
        self._call("evtchn_unbind")
        remote = self.remote_of.pop(local_port, None)
        if remote is None:
            raise XenError(errno.EINVAL, f"local port {local_port} not bound")
        del self.local_of[remote]

    def evtchn_pending(self) -> int | None:
        self._call("evtchn_pending")
        try:
            os.read(self._rfd, 1)
        except BlockingIOError:
            return None
        return self._ring.popleft()

    def evtchn_unmask(self, local_port: int) -> None:
        self._call("evtchn_unmask")
        self._masked.discard(local_port)
        if local_port in self._pending_masked:
            self._pending_masked.discard(local_port)
            self._deliver(local_port)

    def evtchn_notify(self, local_port: int) -> None:
        self._call("evtchn_notify")
        remote = self.remote_of.get(local_port)
        if remote is None:
            raise XenError(errno.EINVAL, f"local port {local_port} not bound")
        event = self.notified.get(remote)
        if event is not None:
            event.set()

    def _deliver(self, local: int) -> None:
        """An event on `local`: queued for the reader and masked until unmasked (Linux)."""
        if local in self._masked:
            self._pending_masked.add(local)
            return
        self._masked.add(local)
        self._ring.append(local)
        os.write(self._wfd, b"\0")

    def guest_notify(self, remote: int) -> None:
        """Xen signalling the server on the guest's port `remote` (if anyone bound it)."""
        local = self.local_of.get(remote)
        if local is not None:
            self._deliver(local)

    # ------------------------------------------------------------------ xenstore

    def xenstore_write(self, path: str, value: str) -> None:
        self._call("xenstore_write")
        self.xenstore[path] = value

    def xenstore_read(self, path: str) -> str | None:
        self._call("xenstore_read")
        return self.xenstore.get(path)

    def xenstore_remove(self, path: str) -> None:
        self._call("xenstore_remove")
        self.xenstore.pop(path, None)

    def has_device_model(self) -> bool:
        self._call("has_device_model")
        return self.device_model

    def watch_domain_end(self) -> int:
        """Like xenstored, which fires a new watch once at once."""
        self._call("watch_domain_end")
        if self._watch is None:
            self._watch = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.fire_release_watch()
        return self._watch[0]

    def domain_ended(self) -> bool:
        self._call("domain_ended")
        if self._watch is not None:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._watch[0], 64):
                    pass
        return self.released

    def close(self) -> None:
        self._call("close")
        self.closed = True
        os.close(self._rfd)
        os.close(self._wfd)
        if self._watch is not None:
            for fd in self._watch:
                os.close(fd)
            self._watch = None

    # ------------------------------------------------------------------ Xen's routing

    def mmio_server(self, addr: int, size: int) -> SimServer | None:
        for s in self.servers.values():
            if s.enabled and not s.destroyed:
                for a, b in s.mmio:
                    if a <= addr and addr + size - 1 <= b:
                        return s
        return None

    def config_server(self, sbdf: tuple[int, int, int, int]) -> SimServer | None:
        for s in self.servers.values():
            if s.enabled and not s.destroyed and sbdf in s.pcidevs:
                return s
        return None

    def post(self, addr: int, size: int, data: int, *, type: int = IoreqType.COPY) -> bool:
        """A posted write, queued on the ring of whichever server claims `addr` (as Xen
        does for VGA writes), then that server notified. False if no server takes it."""
        s = self.mmio_server(addr, size) if type == IoreqType.COPY else self._any_ring()
        if s is None or s.bufioreq is None:
            self.default_accesses.append(("posted", addr))
            return False
        if not post_buffered_write(
            s.bufioreq, addr, size, data, type=type, mode=BufioreqMode(s.mode)
        ):
            return False
        self.guest_notify(REMOTE_BUF_PORT)
        return True

    def _any_ring(self) -> SimServer | None:
        for s in self.servers.values():
            if s.enabled and not s.destroyed and s.bufioreq is not None:
                return s
        return None

    def ring_raw(self, entries: bytes, advance: int) -> None:
        """Corrupt the ring: write `entries` at the write pointer and move it by `advance`."""
        s = self.server()
        assert s.bufioreq is not None
        page = s.bufioreq
        wr = int.from_bytes(page[4:8], "little")
        at = 8 + (wr % 511) * 8
        page[at : at + len(entries)] = entries
        page[4:8] = ((wr + advance) & 0xFFFFFFFF).to_bytes(4, "little")
        self.guest_notify(REMOTE_BUF_PORT)

    def ring_pointers(self) -> tuple[int, int]:
        page = self.server().bufioreq
        assert page is not None
        return int.from_bytes(page[0:4], "little"), int.from_bytes(page[4:8], "little")


class SimVcpu:
    """One guest vCPU: its accesses trap into its slot and it waits for the answer."""

    def __init__(self, sim: SimHypervisor, index: int) -> None:
        self.sim = sim
        self.index = index
        self.busy = False
        self.answered = 0

    # ---------------------------------------------------------------- plain accesses

    async def read(self, addr: int, size: int) -> int:
        if self.sim.mmio_server(addr, size) is None:
            self.sim.default_accesses.append(("read", addr))
            return ones(size)
        done = await self.send(_req(IoreqType.COPY, addr, size, IOREQ_READ))
        return done.data

    async def write(self, addr: int, size: int, value: int) -> None:
        if self.sim.mmio_server(addr, size) is None:
            self.sim.default_accesses.append(("write", addr))
            return
        await self.send(_req(IoreqType.COPY, addr, size, IOREQ_WRITE, value))

    async def read_bytes(self, addr: int, length: int, size: int = 8) -> bytes:
        out = bytearray()
        for at in range(addr, addr + length, size):
            out += (await self.read(at, size)).to_bytes(size, "little")
        return bytes(out)

    async def write_bytes(self, addr: int, data: bytes, size: int = 8) -> None:
        for i in range(0, len(data), size):
            await self.write(addr + i, size, int.from_bytes(data[i : i + size], "little"))

    # ---------------------------------------------------------------- rep accesses

    async def rep(
        self,
        addr: int,
        size: int,
        count: int,
        *,
        read: bool,
        buffer: int | None = None,
        value: int = 0,
        df: bool = False,
    ) -> IoReq:
        """`rep movs` (through a guest buffer at `buffer`) or `rep stos`-like (a value)."""
        req = IoReq(
            addr,
            buffer if buffer is not None else value,
            count,
            size,
            0,
            IoreqState.READY,
            buffer is not None,
            IOREQ_READ if read else IOREQ_WRITE,
            df,
            IoreqType.COPY,
        )
        return await self.send(req)

    # ---------------------------------------------------------------- port I/O

    async def port_read(self, port: int, size: int) -> int:
        """`in` at `port`, routed as Xen routes it (see `_port`)."""
        req = self._port(port, size, IOREQ_READ, 0)
        if req is None:
            return ones(size)
        return (await self.send(req)).data & ones(size)

    async def port_write(self, port: int, size: int, value: int) -> None:
        req = self._port(port, size, IOREQ_WRITE, value)
        if req is not None:
            await self.send(req)

    def _port(self, port: int, size: int, direction: int, data: int) -> IoReq | None:
        """Xen's routing of port I/O (x86 hvm/io.c and ioreq.c): a 4-byte write to 0xcf8 is
        latched (and still goes on to a server); an access to 0xcfc-0xcff while the latch is
        enabled becomes a PCI_CONFIG request for the server that claimed the function, or
        reaches nobody; any other port goes to the server that claimed it. Nobody: the
        default device model if the guest has one, else all-ones / dropped."""
        sim = self.sim
        if port == 0xCF8 and size == 4 and direction == IOREQ_WRITE:
            sim.pci_cf8 = data & 0xFFFF_FFFF
        cf8 = sim.pci_cf8
        if port & ~3 == 0xCFC and cf8 & (1 << 31):
            bus, devfn = (cf8 >> 16) & 0xFF, (cf8 >> 8) & 0xFF
            sbdf = (0, bus, devfn >> 3, devfn & 7)
            reg = (cf8 & 0xFC) | (port & 3)
            if sim.config_server(sbdf) is None:
                sim.default_accesses.append(("config-port", port))
                return None
            addr = encode_pci_config_addr(*sbdf, reg)
            return _req(IoreqType.PCI_CONFIG, addr, size, direction, data)
        for s in sim.servers.values():
            claimed = any(a <= port and port + size - 1 <= b for a, b in s.pio)
            if s.enabled and not s.destroyed and claimed:
                return _req(IoreqType.PIO, port, size, direction, data)
        sim.default_accesses.append(("port", port))
        return None

    # ---------------------------------------------------------------- config space

    async def config_read(
        self, offset: int, size: int, sbdf: tuple[int, int, int, int] = (0, 0, 0x1E, 0)
    ) -> int:
        if self.sim.config_server(sbdf) is None:
            self.sim.default_accesses.append(("config-read", offset))
            return ones(size)
        addr = encode_pci_config_addr(*sbdf, offset)
        return (await self.send(_req(IoreqType.PCI_CONFIG, addr, size, IOREQ_READ))).data

    async def config_write(
        self,
        offset: int,
        size: int,
        value: int,
        sbdf: tuple[int, int, int, int] = (0, 0, 0x1E, 0),
    ) -> None:
        if self.sim.config_server(sbdf) is None:
            self.sim.default_accesses.append(("config-write", offset))
            return
        addr = encode_pci_config_addr(*sbdf, offset)
        await self.send(_req(IoreqType.PCI_CONFIG, addr, size, IOREQ_WRITE, value))

    # ---------------------------------------------------------------- the slot protocol

    async def send(self, req: IoReq, raw: bytes | None = None) -> IoReq:
        """Put `req` (or `raw` bytes) in this vCPU's slot as READY, notify, await the answer.

        Returns the slot as the server left it (state RESP_READY), then frees it as Xen does.
        """
        assert not self.busy, f"vCPU {self.index} already has an access in flight"
        sim = self.sim
        if sim.invalidate_pending:
            # Xen sends a pending map-cache invalidation before the vCPU's next access.
            sim.invalidate_pending = False
            sim.invalidates += 1
            await self.send(
                IoReq(
                    0, 0, 0, 0, 0, IoreqState.READY, False, IOREQ_WRITE, False, IoreqType.INVALIDATE
                )
            )
        server = sim.server()
        page = server.ioreq
        remote = REMOTE_PORT_BASE + self.index
        self.busy = True
        try:
            if raw is not None:
                at = slot_offset(self.index)
                page[at : at + 32] = raw
            else:
                write_slot(page, self.index, replace(req, vp_eport=remote, state=0))
                set_slot_state(page, self.index, IoreqState.READY)
            event = trio.Event()
            sim.notified[remote] = event
            sim.guest_notify(remote)
            while True:
                await event.wait()
                done = read_slot(page, self.index)
                if done.state == IoreqState.RESP_READY:
                    break
                # Notified without an answer: Xen goes on waiting for one.
                event = trio.Event()
                sim.notified[remote] = event
            set_slot_state(page, self.index, IoreqState.NONE)
            self.answered += 1
            return done
        finally:
            sim.notified.pop(remote, None)
            self.busy = False


def _req(kind: int, addr: int, size: int, direction: int, data: int = 0) -> IoReq:
    return IoReq(addr, data, 1, size, 0, IoreqState.READY, False, direction, False, kind)
