"""The device backend: the PCI function's regions on one bus, answering plain calls.

What every transport needs from the device, and nothing about where requests come from: no
socket, no event channel, no wire format (the idea of rust-vmm's vfio-user `ServerBackend`).
A transport receives, calls this, replies. Tests drive it with plain calls.

The PCI function (devmodel/pci) keeps the device's rules: BAR shapes, config masks, counters.
This module only lays its regions out on a `RegionBus` and keeps the bus's address map equal to
what the guest programmed: the function reports every decode change (a BAR written, memory
decoding toggled, a reset) and the backend turns it into one `RegionBus.move`.

Refusals keep the function's answers: an access to an absent BAR (1, 3-5) is refused by the
function (EINVAL, counted in `bad_accesses`); one to a region that is not a BAR or config space
(6 ROM, 8 VGA, any larger index) is EINVAL and not counted, as the vfio-user server always did.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from devmodel.backend.bus import MappedRange, Region, RegionBus, refusing_region
from devmodel.counters import DeviceCounters
from devmodel.pci.function import (
    APERTURE_BAR,
    NUM_REGIONS,
    REGION_CONFIG,
    REGION_ROM,
    REGION_VGA,
    REGISTER_BAR,
    PciFunction,
)
from devmodel.pci.irqs import IrqTable

__all__ = ["BAR_INDEXES", "DeviceBackend", "backend_for"]

BAR_INDEXES = range(6)


class DeviceBackend:
    """One PCI function behind one region bus; owns the function's decode-change hook."""

    __slots__ = ("bus", "counters", "follow_up", "function", "lookup", "route")

    def __init__(self, function: PciFunction) -> None:
        if function.on_decode_change is not None:
            # Two buses following one function would each hold half the truth.
            raise ValueError("this PCI function already reports its decode changes elsewhere")
        self.function = function
        self.counters: DeviceCounters = function.counters
        self.bus = bus = RegionBus(NUM_REGIONS)
        served = {
            APERTURE_BAR: (function.aperture_read, function.aperture_write),
            REGISTER_BAR: (function.register_read, function.register_write),
        }
        for bar in BAR_INDEXES:
            # BAR0 and BAR2 call the function's own method for that BAR (no index to dispatch
            # on: BAR0 is the hot path); an absent BAR gets the function's refusal.
            read, write = served.get(
                bar, (partial(function.bar_read, bar), partial(function.bar_write, bar))
            )
            region = Region(bar, f"BAR{bar}", function.region_size(bar), read, write)
            if bar == APERTURE_BAR:
                # Accesses to resident lent memory need no coroutine: transports try these
                # first and await `read`/`write` only when they say None/False.
                region.read_now = function.aperture_read_now
                region.write_now = function.aperture_write_now
            elif bar == REGISTER_BAR:
                # Registers never wait.
                region.read_now = function.register_read_now
                region.write_now = function.register_write_now
            bus.register(region)
        bus.register(refusing_region(REGION_ROM, "expansion ROM"))
        bus.register(
            Region(
                REGION_CONFIG,
                "config space",
                function.config_size,
                self._config_read,
                self._config_write,
            )
        )
        bus.register(refusing_region(REGION_VGA, "VGA"))
        # Bound once: transports call these per access.
        self.lookup = bus.lookup
        self.route: Callable[[int], tuple[Region, int] | None] = bus.route
        """The region at a guest address; the Xen transport may put a page of its own in
        front (devmodel/xen/pvh_acpi.py serves a PVH guest's ACPI tables that way)."""
        self.follow_up: Callable[[], None] | None = None
        """Work an access put off until the guest has its answer (the page-in poll's, see
        devmodel.polling.PageInPoll), or None. A transport calls it once an access's reply is
        sent, before it waits for the next request; it never waits or raises."""
        function.on_decode_change = self._decode_changed
        self._decode_changed()

    # --- accesses -------------------------------------------------------------------------------

    async def read(self, index: int, offset: int, size: int) -> bytes:
        """Read `size` bytes at `offset` of vfio region `index`; AccessError when refused."""
        return await self.lookup(index).read(offset, size)

    async def write(self, index: int, offset: int, data: bytes) -> None:
        """Write `data` at `offset` of vfio region `index`; AccessError when refused."""
        await self.lookup(index).write(offset, data)

    async def _config_read(self, offset: int, size: int) -> bytes:
        return self.function.config_read(offset, size)

    async def _config_write(self, offset: int, data: bytes) -> None:
        self.function.config_write(offset, data)

    def config_read(self, offset: int, size: int) -> bytes:
        """Config space without an await (config cycles never wait)."""
        return self.function.config_read(offset, size)

    def config_write(self, offset: int, data: bytes) -> None:
        """Through the config masks; a write that moves a BAR moves it on the bus."""
        self.function.config_write(offset, data)

    # --- describing ---------------------------------------------------------------------------

    def region_size(self, index: int) -> int | None:
        """The size of region `index` (0 when defined but absent), None for no such region."""
        region = self.bus.get(index)
        return None if region is None else region.size

    def overlapping_bar(self, address: int, size: int) -> MappedRange | None:
        """The first BAR decoding inside guest [address, address + size), or None."""
        return self.bus.overlapping(address, address + size)

    @property
    def irqs(self) -> IrqTable:
        return self.function.irqs

    # --- lifetime -----------------------------------------------------------------------------

    def reset(self) -> None:
        """Device reset (DEVICE_RESET, FLR); the bus follows whatever it undecoded."""
        self.function.reset()

    def close(self) -> None:
        """Give the function's decode-change hook back; the function itself stays."""
        if self.function.on_decode_change == self._decode_changed:
            self.function.on_decode_change = None

    def _decode_changed(self) -> None:
        function = self.function
        self.bus.move({bar: function.bar_address(bar) for bar in BAR_INDEXES})


def backend_for(device: PciFunction | DeviceBackend) -> tuple[DeviceBackend, bool]:
    """The backend for `device` and whether the caller made it (and so must close it)."""
    if isinstance(device, DeviceBackend):
        return device, False
    return DeviceBackend(device), True
