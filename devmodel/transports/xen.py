"""The Xen transport: an alternate ioreq server that presents the PCI function to one guest.

Xen traps the guest's accesses to what this server claimed (one PCI function's config cycles,
and the BARs' MMIO ranges while memory decoding is on) and writes each into the trapping vCPU's
slot of the shared ioreq page. Each vCPU has its own slot and its own event channel, and stays
blocked until its slot is answered; so every vCPU gets its own worker task here, and a vCPU
whose access waits for a page-in never holds up another (shared/DESIGN.md, "Concurrency").

Everything host-specific goes through `XenPlatform` (devmodel/xen/platform.py): the real one
binds Xen's tool libraries, tests pass a simulated hypervisor. The slot and ring layouts come
from protocol/devmodel_wire/xen, which is checked against Xen's headers.

Answers the guest gets, by case (all counted in DeviceCounters):
- A read the device refuses (bad size, misaligned, outside a BAR, a lost lender under the
  all-ones policy...) returns all-ones, as a PCI master abort does; a refused write is dropped.
  The device counts `bad_accesses` (or the engine `failed_accesses`).
- An MMIO address inside no BAR of ours, a PCI_CONFIG cycle for another function, port I/O
  (nothing is claimed): all-ones or dropped, `bad_accesses` (Xen routed what we never claimed).
- A malformed request (unknown type, count 0, a size that is not 1/2/4/8, a rep whose buffer
  is larger than `MAX_REP_BYTES` or wraps, a config cycle with count > 1): all-ones or
  dropped, `protocol_errors`. The slot is always answered: a vCPU is never left blocked.
- A rep access through a pointer (`data_is_ptr`) whose guest buffer lies in one of our BARs
  (lent memory, or registers: neither is guest RAM, and the seed forbids reaching lent memory
  through a foreign mapping): refused, the buffer and the BAR untouched, `bad_accesses`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from typing import Final, Protocol

import trio

from devmodel.control.toolstack import StartupError
from devmodel.counters import DeviceCounters
from devmodel.pci.errors import AccessError
from devmodel.pci.function import APERTURE_BAR, REGISTER_BAR, PciFunction
from devmodel.ratelimit import RateLimitedLogger
from devmodel.xen.platform import GuestMapping, IoreqPages, XenError, XenPlatform
from devmodel_wire.xen import (
    IOREQ_SIZE,
    PAGE_SIZE,
    SLOTS_PER_PAGE,
    BufferedRing,
    BufferedWrite,
    BufioreqMode,
    IoReq,
    IoreqState,
    IoreqType,
    XenAbiError,
    complete_slot,
    decode_pci_config_addr,
    read_slot,
    ring_pointers,
    set_slot_state,
    validate_ioreq,
)

log = logging.getLogger("devmodel.xen")

DEFAULT_SBDF: Final = (0, 0, 0x1E, 0)
"""Where the function appears: 0000:00:1e.0. QEMU, the guest's default device model, gives
its devices (emulated NICs, passed-through devices) the lowest free slot, so a slot near the
top of bus 0 is the least likely to collide; a collision would hide QEMU's device there."""

MAX_REP_BYTES: Final = 64 << 10
"""The largest rep access served (count * size). Xen keeps a data_is_ptr buffer inside one
guest page; the bound only stops a corrupt slot from making one request loop 2**32 times."""

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

_READ_POINTER: Final = struct.Struct("<I")
_U64: Final = (1 << 64) - 1


def _ones(size: int) -> int:
    return (1 << (8 * size)) - 1 if 0 < size <= 8 else _U64


class P2mMapper(Protocol):
    """The seam for the lending hypercall: resident BAR0 windows mapped into the guest's p2m.

    Until Xen can map a lender's pages into a borrower as a revocable lease, every access to
    BAR0 is trapped and emulated (`EmulateEverything`). A mapper for the hypercall would map a
    resident window when a trapped access touches it (`window_trapped`), so the guest's next
    accesses go straight to memory, and take it out again (with Xen's TLB flush) when the
    engine revokes it: `unmap` is registered as one of the lease engine's `unmap_hooks`, which
    a revoke awaits before it drops the engine's own access and acknowledges.
    """

    map_on_trap: bool
    """False: `window_trapped` is never called (saves the hot path a call)."""

    def window_trapped(self, bar0_base: int, offset: int) -> None:
        """A trapped access to BAR0 `offset` found its window resident; map it if wanted."""

    async def unmap(self, offset: int, length: int) -> None:
        """BAR0 [offset, offset + length) is being revoked: remove it from the guest's p2m."""

    def bar_moved(self, old_base: int | None, new_base: int | None) -> None:
        """BAR0 moved or stopped decoding: mappings at the old base must go at once."""


class EmulateEverything:
    """No p2m mappings at all: every BAR0 access traps and is served by the lease engine."""

    map_on_trap = False

    def window_trapped(self, bar0_base: int, offset: int) -> None:
        pass

    async def unmap(self, offset: int, length: int) -> None:
        pass

    def bar_moved(self, old_base: int | None, new_base: int | None) -> None:
        pass


def _open_host(domid: int) -> XenPlatform:
    """The real host, imported only when used (it loads Xen's libraries).

    Xen's libraries report their own open failures on stderr through their default logger
    ("xencall: error: ..."); that text is caught here and folded into the one line a
    failed start prints, so a toolstack's log gets one message, not two.
    """
    try:
        from devmodel.xen.host import XenHost  # noqa: PLC0415
    except ImportError as exc:
        raise StartupError(f"the Xen host interface is not available: {exc}") from None
    with _captured_stderr() as said:
        try:
            host: XenPlatform = XenHost(domid)
        except (OSError, ValueError) as exc:
            failure: BaseException | None = exc
        else:
            failure = None
    libraries = "; ".join(line.strip() for line in said if line.strip())
    if failure is not None:
        extra = f" ({libraries})" if libraries else ""
        raise StartupError(
            f"cannot open Xen's interfaces for domain {domid}: {failure}{extra}"
        ) from None
    if libraries:
        log.info("Xen's libraries said: %s", libraries)
    return host


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """File descriptor 2 redirected to a temporary file; its lines in the list afterwards."""
    lines: list[str] = []
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield lines
            finally:
                os.dup2(saved, 2)
                tmp.seek(0)
                lines.extend(tmp.read(4096).decode(errors="replace").splitlines())
    finally:
        os.close(saved)


async def serve_xen(
    device: PciFunction,
    counters: DeviceCounters,
    domid: int,
    *,
    platform: XenPlatform | None = None,
    sbdf: tuple[int, int, int, int] = DEFAULT_SBDF,
    mapper: P2mMapper | None = None,
    state_key: str = STATE_KEY,
    task_status: trio.TaskStatus[XenServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `device` to guest `domid` as an ioreq server until cancelled.

    Without `platform` the real host is opened; either way this function owns the platform
    and closes it on the way out. A failure before the server serves raises StartupError
    (`devmodel run` exits 1 with its message) after undoing whatever was set up.
    """
    if platform is None:
        platform = _open_host(domid)
    server = XenServer(device, counters, platform, sbdf, mapper or EmulateEverything())
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


class XenServer:
    """One ioreq server: setup, the dispatch loop, one worker per vCPU, and teardown."""

    def __init__(
        self,
        device: PciFunction,
        counters: DeviceCounters,
        platform: XenPlatform,
        sbdf: tuple[int, int, int, int],
        mapper: P2mMapper,
    ) -> None:
        self.device = device
        self.counters = counters
        self.platform = platform
        self.sbdf = sbdf
        self.mapper = mapper
        self.server_id: int | None = None
        self.enabled = False
        self.vcpus = 0
        self.pages: IoreqPages | None = None
        self.ioreq: memoryview | bytearray = bytearray()
        self.bufioreq: memoryview | None = None
        self.ring = BufferedRing()
        self.vcpu_port: list[int] = []  # vCPU -> local port
        self.port_vcpu: dict[int, int] = {}  # local port -> vCPU
        self.buf_port: int | None = None
        self.pcidev_mapped = False
        # Claimed MMIO ranges: (start, end inclusive, bar).
        self.ranges: list[tuple[int, int, int]] = []
        self.state_key: str | None = None
        self.served = 0
        self._busy: list[bool] = []
        self._requests: list[IoReq | None] = []
        self._posted_before: list[int] = []  # per vCPU: posted writes to finish first
        self._lots: list[trio.lowlevel.ParkingLot] = []
        self._posted: list[BufferedWrite] = []
        self._posted_done = 0
        self._posted_queued = 0
        self._posted_wake = trio.Event()
        self._posted_progress = trio.Event()
        self._bar0_base: int | None = None
        self._hook_installed = False
        self._log = RateLimitedLogger(log)
        self._stopped = False

    # ------------------------------------------------------------------ setup and teardown

    def start(self, state_key: str) -> None:
        """Everything up to enabling the server and announcing it; undone by `stop`."""
        p = self.platform
        p.restrict()
        vcpus = p.vcpu_count()
        if not 0 < vcpus <= SLOTS_PER_PAGE:
            raise XenError(
                errno.E2BIG,
                f"the guest has {vcpus} vCPUs; one ioreq page serves 1 to {SLOTS_PER_PAGE}",
            )
        self.vcpus = vcpus
        self.server_id = p.create_ioreq_server(BUFIOREQ_MODE)
        self.pages = p.map_ioreq_pages(self.server_id, vcpus)
        self.ioreq = self.pages.ioreq
        if len(self.ioreq) < vcpus * IOREQ_SIZE:
            raise XenError(
                errno.EINVAL,
                f"the ioreq mapping has {len(self.ioreq)} bytes, {vcpus} vCPUs need "
                f"{vcpus * IOREQ_SIZE}",
            )
        self.bufioreq = self.pages.bufioreq
        for vcpu in range(vcpus):
            remote = read_slot(self.ioreq, vcpu).vp_eport
            local = p.evtchn_bind(remote)
            self.vcpu_port.append(local)
            self.port_vcpu[local] = vcpu
        self._busy = [False] * vcpus
        self._requests = [None] * vcpus
        self._posted_before = [0] * vcpus
        self._lots = [trio.lowlevel.ParkingLot() for _ in range(vcpus)]
        remote_buf = p.bufioreq_port(self.server_id)
        if remote_buf is not None and self.bufioreq is not None:
            self.buf_port = p.evtchn_bind(remote_buf)
        p.map_pcidev(self.server_id, *self.sbdf)
        self.pcidev_mapped = True
        hooks = getattr(self.device.aperture, "unmap_hooks", None)
        if isinstance(hooks, list):
            hooks.append(self.mapper.unmap)
            self._hook_installed = True
        self.device.on_decode_change = self.decode_changed
        self._claim_bars()
        p.set_ioreq_server_state(self.server_id, True)
        self.enabled = True
        p.xenstore_write(state_key, "running")
        self.state_key = state_key
        seg, bus, dev, fn = self.sbdf
        log.info(
            "ioreq server %d for domain %d: %d vCPU(s), PCI %04x:%02x:%02x.%x%s",
            self.server_id,
            p.domid,
            vcpus,
            seg,
            bus,
            dev,
            fn,
            ", buffered ring" if self.buf_port is not None else "",
        )

    def stop(self) -> None:
        """Undo `start` in reverse, whatever state it reached; each step is tried alone."""
        if self._stopped:
            return
        self._stopped = True
        p = self.platform
        steps: list[tuple[str, Callable[[], None]]] = []
        if self.state_key is not None:
            key = self.state_key
            steps.append(("remove the xenstore key", lambda: p.xenstore_remove(key)))
        sid = self.server_id
        if sid is not None and self.enabled:
            steps.append(("disable the server", lambda: p.set_ioreq_server_state(sid, False)))
        if self.device.on_decode_change == self.decode_changed:
            self.device.on_decode_change = None
        if sid is not None:
            for start, end, _bar in self.ranges:
                unclaim = partial(p.unmap_io_range, sid, True, start, end)
                steps.append((f"unclaim {start:#x}-{end:#x}", unclaim))
            if self.pcidev_mapped:
                steps.append(("unclaim the PCI function", lambda: p.unmap_pcidev(sid, *self.sbdf)))
            steps.append(("destroy the server", lambda: p.destroy_ioreq_server(sid)))
        for port in [*self.vcpu_port, *([self.buf_port] if self.buf_port is not None else [])]:
            steps.append((f"unbind port {port}", partial(p.evtchn_unbind, port)))
        if self.pages is not None:
            pages = self.pages
            steps.append(("unmap the ioreq pages", pages.close))
        steps.append(("close the Xen handles", p.close))
        if self._hook_installed:
            hooks = getattr(self.device.aperture, "unmap_hooks", [])
            with contextlib.suppress(ValueError):
                hooks.remove(self.mapper.unmap)
        for what, step in steps:
            try:
                step()
            except (XenError, OSError) as exc:
                log.warning("stopping: cannot %s: %s", what, exc)
        self.ranges = []
        self.enabled = False
        self.ioreq = bytearray()
        self.bufioreq = None
        log.info("ioreq server stopped after %d requests", self.served)

    # ------------------------------------------------------------------ BAR ranges

    def _bar_ranges(self) -> list[tuple[int, int, int]]:
        ranges = []
        for bar in (APERTURE_BAR, REGISTER_BAR):
            base = self.device.bar_address(bar)
            size = self.device.region_size(bar)
            if base is not None and size:
                ranges.append((base, base + size - 1, bar))
        return ranges

    def _claim_bars(self) -> None:
        sid = self.server_id
        assert sid is not None
        wanted = self._bar_ranges()
        old_base = self._bar0_base
        for r in self.ranges:
            if r not in wanted:
                try:
                    self.platform.unmap_io_range(sid, True, r[0], r[1])
                except XenError as exc:
                    log.warning("cannot unclaim %#x-%#x: %s", r[0], r[1], exc)
        kept = [r for r in self.ranges if r in wanted]
        for r in wanted:
            if r in kept:
                continue
            try:
                self.platform.map_io_range(sid, True, r[0], r[1])
            except XenError as exc:
                # Another server holds part of it (or Xen refused): the guest's accesses there
                # go elsewhere; nothing here can fix a guest that programs overlapping BARs.
                log.error("cannot claim BAR%d at %#x-%#x: %s", r[2], r[0], r[1], exc)
                continue
            kept.append(r)
        self.ranges = sorted(kept)
        self._bar0_base = next((r[0] for r in self.ranges if r[2] == APERTURE_BAR), None)
        if old_base != self._bar0_base:
            self.mapper.bar_moved(old_base, self._bar0_base)
        log.info(
            "claimed MMIO: %s",
            ", ".join(f"BAR{b} {s:#x}-{e:#x}" for s, e, b in self.ranges) or "none",
        )

    def decode_changed(self) -> None:
        """The guest moved a BAR or toggled memory decoding: claim exactly what decodes now."""
        if self.server_id is not None and not self._stopped:
            self._claim_bars()

    def _route(self, addr: int) -> tuple[int, int] | None:
        for start, end, bar in self.ranges:
            if start <= addr <= end:
                return bar, addr - start
        return None

    # ------------------------------------------------------------------ running

    async def run(self, task_status: trio.TaskStatus[XenServer]) -> None:
        """Start a worker per vCPU, report started, then dispatch events until cancelled."""
        async with trio.open_nursery() as nursery:
            for vcpu in range(self.vcpus):
                nursery.start_soon(self._worker, vcpu)
            if self.buf_port is not None:
                nursery.start_soon(self._posted_writer)
            task_status.started(self)
            await self._dispatch()

    async def _dispatch(self) -> None:
        p = self.platform
        fd = p.evtchn_fd()
        port_vcpu = self.port_vcpu
        while True:
            await trio.lowlevel.wait_readable(fd)
            while True:
                port = p.evtchn_pending()
                if port is None:
                    break
                p.evtchn_unmask(port)
                vcpu = port_vcpu.get(port)
                if vcpu is not None:
                    self._take(vcpu)
                elif port == self.buf_port:
                    self._drain_ring()
                else:
                    self._log.warning("event on unknown port %d", port)

    def _take(self, vcpu: int) -> None:
        """Claim vCPU `vcpu`'s slot if it holds a new request, and wake its worker."""
        if self._busy[vcpu]:
            return  # its worker is still on the last request; Xen would not send another
        page = self.ioreq
        try:
            req = read_slot(page, vcpu)
        except XenAbiError as exc:
            self._log.warning("vCPU %d: %s", vcpu, exc)
            return
        if req.state != IoreqState.READY:
            return  # a spurious or repeated notification
        set_slot_state(page, vcpu, IoreqState.INPROCESS)
        # Posted writes Xen queued before this request are performed before it (as QEMU does).
        if self.buf_port is not None:
            self._drain_ring()
        self._requests[vcpu] = req
        self._posted_before[vcpu] = self._posted_queued
        self._busy[vcpu] = True
        self._lots[vcpu].unpark()

    async def _worker(self, vcpu: int) -> None:
        lot = self._lots[vcpu]
        while True:
            await lot.park()
            req = self._requests[vcpu]
            assert req is not None
            data: int | None = None
            try:
                if self._posted_done < self._posted_before[vcpu]:
                    await self._posted_through(self._posted_before[vcpu])
                data = await self._serve(req)
            except trio.Cancelled:
                # Stopping: answer (all-ones) so the vCPU is not left blocked on a dead server.
                self._answer(vcpu, _ones(req.size) if req.is_read else None)
                raise
            self._answer(vcpu, data)

    def _answer(self, vcpu: int, data: int | None) -> None:
        if self._stopped or not self._busy[vcpu]:
            return
        try:
            complete_slot(self.ioreq, vcpu, data)
            self.platform.evtchn_notify(self.vcpu_port[vcpu])
        except (XenAbiError, XenError) as exc:
            self._log.warning("vCPU %d: cannot answer: %s", vcpu, exc)
        self._requests[vcpu] = None
        self._busy[vcpu] = False
        self.served += 1

    # ------------------------------------------------------------------ one request

    async def _serve(self, req: IoReq) -> int | None:
        """The value a read returns (None for a write and for requests without one)."""
        try:
            validate_ioreq(req)
        except XenAbiError as exc:
            return self._malformed(req, str(exc))
        kind = req.type
        if kind == IoreqType.COPY:
            return await self._mmio(req)
        if kind == IoreqType.PCI_CONFIG:
            return self._config(req)
        if kind == IoreqType.PIO:
            self.counters.bad_accesses += 1
            self._log.warning("port I/O at %#x was routed here; none is claimed", req.addr)
            return _ones(req.size) if req.is_read and not req.data_is_ptr else None
        # INVALIDATE: drop cached guest mappings (none are kept: each data_is_ptr access maps
        # and unmaps its buffer). TIMEOFFSET: the guest set its RTC; nothing here keeps time.
        return None

    def _malformed(self, req: IoReq, why: str) -> int | None:
        self.counters.protocol_errors += 1
        self._log.warning("malformed ioreq (type %d at %#x): %s", req.type, req.addr, why)
        if req.is_read and not req.data_is_ptr:
            return _ones(req.size)
        return None

    async def _mmio(self, req: IoReq) -> int | None:
        size = req.size
        if req.count == 1 and not req.data_is_ptr:
            if req.is_read:
                return await self._read(req.addr, size)
            await self._write(req.addr, size, req.data)
            return None
        if size not in (1, 2, 4, 8):
            # Through a pointer Xen allows any element size up to a page; the device's
            # registers and aperture take 1, 2, 4 or 8 bytes.
            self.counters.bad_accesses += 1
            self._log.warning("rep access with %d-byte elements refused", size)
            return None
        total = req.count * size
        step = -size if req.df else size
        last = req.addr + step * (req.count - 1)
        if total > MAX_REP_BYTES or not 0 <= last <= _U64 - size:
            return self._malformed(req, f"rep of {req.count} x {size} bytes")
        if not req.data_is_ptr:
            # The same value for every element, as QEMU does: a write stores it at each
            # address, a read performs every element's read and returns the last one.
            value: int | None = None
            for i in range(req.count):
                addr = req.addr + step * i
                if req.is_read:
                    value = await self._read(addr, size)
                else:
                    await self._write(addr, size, req.data)
            return value
        await self._rep_through(req, step)
        return None

    async def _rep_through(self, req: IoReq, step: int) -> None:
        """`rep movs` between the BAR and guest RAM at `req.data`, both moving by `step`."""
        size = req.size
        count = req.count
        end_data = req.data + step * (count - 1)
        low = min(req.data, end_data)
        high = max(req.data, end_data) + size  # exclusive
        if low < 0 or high > _U64 + 1:
            self._malformed(req, "the guest buffer wraps around the address space")
            return None
        for start, end, bar in self.ranges:
            if low <= end and start < high:
                self.counters.bad_accesses += 1
                self._log.warning(
                    "rep access with its guest buffer %#x-%#x inside BAR%d refused",
                    low,
                    high - 1,
                    bar,
                )
                return None
        first = low // PAGE_SIZE
        frames = list(range(first, (high - 1) // PAGE_SIZE + 1))
        try:
            mapping: GuestMapping = self.platform.map_guest(frames, writable=req.is_read)
        except XenError as exc:
            self.counters.bad_accesses += 1
            self._log.warning("cannot map the guest buffer at %#x: %s", low, exc)
            return None
        try:
            view = mapping.view
            base = first * PAGE_SIZE
            for i in range(count):
                addr = req.addr + step * i
                at = req.data + step * i - base
                if req.is_read:
                    value = await self._read(addr, size)
                    view[at : at + size] = value.to_bytes(size, "little")
                else:
                    value = int.from_bytes(view[at : at + size], "little")
                    await self._write(addr, size, value)
        finally:
            mapping.close()
        return None

    async def _read(self, addr: int, size: int) -> int:
        where = self._route(addr)
        if where is None:
            self.counters.bad_accesses += 1
            self._log.warning("read of %d bytes at %#x: no BAR of ours there", size, addr)
            return _ones(size)
        bar, offset = where
        try:
            data = await self.device.bar_read(bar, offset, size)
        except AccessError as exc:
            self._log.warning("refused read at %#x: %s", addr, exc)
            return _ones(size)
        if bar == APERTURE_BAR and self.mapper.map_on_trap and self._bar0_base is not None:
            self.mapper.window_trapped(self._bar0_base, offset)
        return int.from_bytes(data, "little")

    async def _write(self, addr: int, size: int, value: int) -> None:
        where = self._route(addr)
        if where is None:
            self.counters.bad_accesses += 1
            self._log.warning("write of %d bytes at %#x: no BAR of ours there", size, addr)
            return
        bar, offset = where
        try:
            await self.device.bar_write(bar, offset, (value & _ones(size)).to_bytes(size, "little"))
        except AccessError as exc:
            self._log.warning("refused write at %#x: %s", addr, exc)
            return
        if bar == APERTURE_BAR and self.mapper.map_on_trap and self._bar0_base is not None:
            self.mapper.window_trapped(self._bar0_base, offset)

    def _config(self, req: IoReq) -> int | None:
        size = req.size
        if req.count != 1 or req.data_is_ptr or size not in (1, 2, 4):
            return self._malformed(req, f"config cycle of {req.count} x {size} bytes")
        try:
            where = decode_pci_config_addr(req.addr)
        except XenAbiError as exc:
            return self._malformed(req, str(exc))
        if (where.segment, where.bus, where.device, where.function) != self.sbdf:
            self.counters.bad_accesses += 1
            self._log.warning("config cycle for %#x, not our function", req.addr)
            return _ones(size) if req.is_read else None
        try:
            if req.is_read:
                return int.from_bytes(self.device.config_read(where.offset, size), "little")
            self.device.config_write(
                where.offset, (req.data & _ones(size)).to_bytes(size, "little")
            )
        except AccessError as exc:
            self._log.warning("refused config access at %#x: %s", where.offset, exc)
            return _ones(size) if req.is_read else None
        return None

    # ------------------------------------------------------------------ posted writes

    def _drain_ring(self) -> None:
        page = self.bufioreq
        if page is None:
            return
        try:
            writes = self.ring.drain(page)
        except XenAbiError as exc:
            # Only Xen writes the ring; if it cannot be parsed nothing in it can be trusted.
            # Skip to the write pointer so the ring keeps flowing (the entries are lost).
            self.counters.protocol_errors += 1
            self._log.warning("buffered ring skipped: %s", exc)
            _rd, wr = ring_pointers(page)
            _READ_POINTER.pack_into(page, 0, wr)
            return
        if writes:
            self._posted.extend(writes)
            self._posted_queued += len(writes)
            self._posted_wake.set()

    async def _posted_through(self, target: int) -> None:
        while self._posted_done < target:
            await self._posted_progress.wait()

    async def _posted_writer(self) -> None:
        """Performs posted writes one after another, in the order Xen queued them."""
        while True:
            if not self._posted:
                self._posted_wake = trio.Event()
                await self._posted_wake.wait()
                continue
            w = self._posted.pop(0)
            if w.type in (IoreqType.COPY, IoreqType.PIO):
                if w.type == IoreqType.COPY:
                    await self._write(w.addr, w.size, w.data)
                else:
                    self.counters.bad_accesses += 1
                    self._log.warning("posted port write at %#x; none is claimed", w.addr)
            # TIMEOFFSET (broadcast to every server): nothing here keeps the guest's time.
            self._posted_done += 1
            progress, self._posted_progress = self._posted_progress, trio.Event()
            progress.set()


__all__ = [
    "DEFAULT_SBDF",
    "MAX_REP_BYTES",
    "STATE_KEY",
    "EmulateEverything",
    "P2mMapper",
    "XenServer",
    "serve_xen",
]
