"""One ioreq, decoded and served: what a guest access means and the value it gets back.

COPY (MMIO, single or rep, with the data inline or through a guest buffer), PCI_CONFIG, PIO,
INVALIDATE and TIMEOFFSET. Regions are found through the backend's bus by guest address; this
module owns only Xen's encoding of an access and its answers, by case (all counted in
DeviceCounters):

- A read the device refuses (bad size, misaligned, outside a BAR, a lost lender under the
  all-ones policy...) returns all-ones, as a PCI master abort does; a refused write is dropped.
  The device counts `bad_accesses` (or the engine `failed_accesses`).
- An MMIO address inside no BAR of ours, a PCI_CONFIG cycle for another function, port I/O
  other than the PCI configuration ports when this server answers them (pci_ports.py):
  all-ones or dropped, `bad_accesses` (Xen routed what we never claimed).
- A malformed request (unknown type, count 0, a size that is not 1/2/4/8, a rep whose buffer
  is larger than `MAX_REP_BYTES` or wraps, a config cycle with count > 1): all-ones or
  dropped, `protocol_errors`.
- A rep access through a pointer (`data_is_ptr`) whose guest buffer lies in one of our BARs
  (lent memory, or registers: neither is guest RAM, and the seed forbids reaching lent memory
  through a foreign mapping): refused, the buffer and the BAR untouched, `bad_accesses`.

Two ways to serve, one meaning. `serve` (async) serves anything, waiting for a page-in if it
must; the vCPU's worker task awaits it. `serve_now` and `mmio_now` answer without waiting the
requests that cannot block (config cycles, port I/O, INVALIDATE, TIMEOFFSET, malformed ones,
BAR2 registers, BAR0 when its window is resident: the regions' `read_now`/`write_now`) and say
`LATER`, having done and counted nothing, for the rest (an access that may fault, a rep); the
dispatcher (vcpus.py) calls them in place and hands only a `LATER` to the worker, which then
serves the same request with `serve`.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

from devmodel.backend.device import DeviceBackend
from devmodel.pci.errors import AccessError
from devmodel.pci.function import APERTURE_BAR
from devmodel.ratelimit import RateLimitedLogger
from devmodel.xen.p2m import P2mMapper
from devmodel.xen.pci_ports import PciConfigPorts
from devmodel.xen.platform import GuestMapping, XenError, XenPlatform
from devmodel_wire.xen import (
    PAGE_SIZE,
    IoReq,
    IoreqType,
    XenAbiError,
    decode_pci_config_addr,
    validate_ioreq,
)

__all__ = ["LATER", "MAX_REP_BYTES", "IoreqHandler", "Later", "ones"]

MAX_REP_BYTES: Final = 64 << 10
"""The largest rep access served (count * size). Xen keeps a data_is_ptr buffer inside one
guest page; the bound only stops a corrupt slot from making one request loop 2**32 times."""

_U64: Final = (1 << 64) - 1


class Later(Enum):
    """What `serve_now` says of a request that may have to wait: serve it with `serve`."""

    LATER = "later"


LATER: Final = Later.LATER


def ones(size: int) -> int:
    """All-ones of `size` bytes: what a master abort reads."""
    return (1 << (8 * size)) - 1 if 0 < size <= 8 else _U64


class IoreqHandler:
    """Serves one ioreq at a time (many concurrently, one per vCPU) on the device backend."""

    def __init__(
        self,
        backend: DeviceBackend,
        platform: XenPlatform,
        sbdf: tuple[int, int, int, int],
        mapper: P2mMapper,
        log: RateLimitedLogger,
    ) -> None:
        self.backend = backend
        self.counters = backend.counters
        self.platform = platform
        self.sbdf = sbdf
        self.mapper = mapper
        self._log = log
        self.ports: PciConfigPorts | None = None
        """The PCI configuration ports and host bridge, when this server answers them."""

    async def serve(self, req: IoReq) -> int | None:
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
            return self._pio(req)
        # INVALIDATE: drop cached guest mappings (none are kept: each data_is_ptr access maps
        # and unmaps its buffer). TIMEOFFSET: the guest set its RTC; nothing here keeps time.
        return None

    def serve_now(self, req: IoReq) -> int | Later | None:
        """`serve` if the request cannot block; LATER (nothing done) if it may: a single
        access that must wait for its window, a rep (it may fault halfway)."""
        try:
            validate_ioreq(req)
        except XenAbiError as exc:
            return self._malformed(req, str(exc))
        kind = req.type
        if kind == IoreqType.COPY:
            if req.count == 1 and not req.data_is_ptr:
                return self.mmio_now(req.addr, req.size, req.is_read, req.data)
            return LATER
        if kind == IoreqType.PCI_CONFIG:
            return self._config(req)
        if kind == IoreqType.PIO:
            return self._pio(req)
        return None  # INVALIDATE, TIMEOFFSET: as in `serve`

    def mmio_now(self, addr: int, size: int, is_read: bool, value: int) -> int | Later | None:
        """One MMIO access (count 1, its data inline, `size` 1/2/4/8) without waiting: the
        value read (None for a write), or LATER when the region cannot answer at once (a
        window not resident, or a refusal: `serve` then refuses and counts it as ever)."""
        where = self.backend.route(addr)
        if where is None:
            self.counters.bad_accesses += 1
            self._log.warning(
                "%s of %d bytes at %#x: no BAR of ours there", "read" if is_read else "write",
                size, addr,
            )
            return ones(size) if is_read else None
        region, offset = where
        result: int | None = None
        if is_read:
            data = region.read_now(offset, size)
            if data is None:
                return LATER
            result = int.from_bytes(data, "little")
        elif not region.write_now(offset, (value & ones(size)).to_bytes(size, "little")):
            return LATER
        if region.index == APERTURE_BAR and self.mapper.map_on_trap:
            self._trapped(region.address, offset)
        return result

    def write_now(self, addr: int, size: int, value: int) -> bool:
        """A posted write without waiting: True once done (or dropped, when no BAR of ours is
        there), False (nothing done) when it must be awaited with `write`."""
        return self.mmio_now(addr, size, False, value) is not LATER

    def _pio(self, req: IoReq) -> int | None:
        ports = self.ports
        if (
            ports is not None
            and req.count == 1
            and not req.data_is_ptr
            and ports.owns_port(req.addr, req.size)
        ):
            if req.is_read:
                return ports.port_read(req.addr, req.size)
            ports.port_write(req.addr, req.size, req.data)
            return None
        self.counters.bad_accesses += 1
        self._log.warning("port I/O at %#x was routed here; not ours", req.addr)
        return ones(req.size) if req.is_read and not req.data_is_ptr else None

    def _malformed(self, req: IoReq, why: str) -> int | None:
        self.counters.protocol_errors += 1
        self._log.warning("malformed ioreq (type %d at %#x): %s", req.type, req.addr, why)
        if req.is_read and not req.data_is_ptr:
            return ones(req.size)
        return None

    async def _mmio(self, req: IoReq) -> int | None:
        size = req.size
        if req.count == 1 and not req.data_is_ptr:
            if req.is_read:
                return await self.read(req.addr, size)
            await self.write(req.addr, size, req.data)
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
                    value = await self.read(addr, size)
                else:
                    await self.write(addr, size, req.data)
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
            return
        inside = self.backend.overlapping_bar(low, high - low)
        if inside is not None:
            self.counters.bad_accesses += 1
            self._log.warning(
                "rep access with its guest buffer %#x-%#x inside BAR%d refused",
                low,
                high - 1,
                inside.bar,
            )
            return
        first = low // PAGE_SIZE
        frames = list(range(first, (high - 1) // PAGE_SIZE + 1))
        try:
            mapping: GuestMapping = self.platform.map_guest(frames, writable=req.is_read)
        except XenError as exc:
            self.counters.bad_accesses += 1
            self._log.warning("cannot map the guest buffer at %#x: %s", low, exc)
            return
        try:
            view = mapping.view
            base = first * PAGE_SIZE
            for i in range(count):
                addr = req.addr + step * i
                at = req.data + step * i - base
                if req.is_read:
                    value = await self.read(addr, size)
                    view[at : at + size] = value.to_bytes(size, "little")
                else:
                    value = int.from_bytes(view[at : at + size], "little")
                    await self.write(addr, size, value)
        finally:
            mapping.close()

    async def read(self, addr: int, size: int) -> int:
        """One MMIO read at guest `addr`, routed by the bus; all-ones when refused."""
        where = self.backend.route(addr)
        if where is None:
            self.counters.bad_accesses += 1
            self._log.warning("read of %d bytes at %#x: no BAR of ours there", size, addr)
            return ones(size)
        region, offset = where
        try:
            data = await region.read(offset, size)
        except AccessError as exc:
            self._log.warning("refused read at %#x: %s", addr, exc)
            return ones(size)
        if region.index == APERTURE_BAR and self.mapper.map_on_trap:
            self._trapped(region.address, offset)
        return int.from_bytes(data, "little")

    async def write(self, addr: int, size: int, value: int) -> None:
        """One MMIO write at guest `addr`, routed by the bus; dropped when refused."""
        where = self.backend.route(addr)
        if where is None:
            self.counters.bad_accesses += 1
            self._log.warning("write of %d bytes at %#x: no BAR of ours there", size, addr)
            return
        region, offset = where
        try:
            await region.write(offset, (value & ones(size)).to_bytes(size, "little"))
        except AccessError as exc:
            self._log.warning("refused write at %#x: %s", addr, exc)
            return
        if region.index == APERTURE_BAR and self.mapper.map_on_trap:
            self._trapped(region.address, offset)

    def _trapped(self, bar0_base: int | None, offset: int) -> None:
        if bar0_base is not None:
            self.mapper.window_trapped(bar0_base, offset)

    def _config(self, req: IoReq) -> int | None:
        size = req.size
        if req.count != 1 or req.data_is_ptr or size not in (1, 2, 4):
            return self._malformed(req, f"config cycle of {req.count} x {size} bytes")
        try:
            where = decode_pci_config_addr(req.addr)
        except XenAbiError as exc:
            return self._malformed(req, str(exc))
        sbdf = (where.segment, where.bus, where.device, where.function)
        if sbdf != self.sbdf:
            ports = self.ports
            if ports is not None and ports.serves(sbdf):  # the host bridge
                if req.is_read:
                    return ports.config_read(sbdf, where.offset, size)
                ports.config_write(sbdf, where.offset, size, req.data & ones(size))
                return None
            self.counters.bad_accesses += 1
            self._log.warning("config cycle for %#x, not our function", req.addr)
            return ones(size) if req.is_read else None
        if req.is_read:
            return self.function_config_read(where.offset, size)
        self.function_config_write(where.offset, size, req.data)
        return None

    def function_config_read(self, offset: int, size: int) -> int:
        """A config read of our function; all-ones when refused."""
        try:
            return int.from_bytes(self.backend.config_read(offset, size), "little")
        except AccessError as exc:
            self._log.warning("refused config access at %#x: %s", offset, exc)
            return ones(size)

    def function_config_write(self, offset: int, size: int, value: int) -> None:
        """A config write of our function; dropped when refused."""
        try:
            self.backend.config_write(offset, (value & ones(size)).to_bytes(size, "little"))
        except AccessError as exc:
            self._log.warning("refused config access at %#x: %s", offset, exc)
