"""Which MMIO ranges this ioreq server claims from Xen: exactly the BARs that decode now.

The backend's region bus knows where each BAR decodes; this module follows its change
notification and turns every new address map into the fewest unclaim/claim calls. A guest that
moves a BAR or toggles memory decoding thus moves what Xen routes here, and the p2m mapper
hears about a BAR0 move at the same moment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

from devmodel.backend.bus import MappedRange, RegionBus
from devmodel.pci.function import APERTURE_BAR
from devmodel.xen.p2m import P2mMapper
from devmodel.xen.platform import XenError, XenPlatform

__all__ = ["BarClaims"]

log = logging.getLogger("devmodel.xen")


class BarClaims:
    """The claimed MMIO ranges of server `server_id`, kept equal to the bus's address map."""

    def __init__(
        self, platform: XenPlatform, server_id: int, bus: RegionBus, mapper: P2mMapper
    ) -> None:
        self.platform = platform
        self.server_id = server_id
        self.bus = bus
        self.mapper = mapper
        self.ranges: list[MappedRange] = []
        self.bar0_base: int | None = None
        self._following = False

    def start(self) -> None:
        """Claim what decodes now, and from now on whatever the bus says decodes."""
        self.bus.subscribe(self._moved)
        self._following = True
        self._claim(self.bus.mapped)

    def release_steps(self) -> list[tuple[str, Callable[[], None]]]:
        """Stop following the bus; the unclaim of every claimed range, as teardown steps."""
        if self._following:
            self.bus.unsubscribe(self._moved)
            self._following = False
        steps: list[tuple[str, Callable[[], None]]] = []
        for start, end, _bar in self.ranges:
            unclaim = partial(self.platform.unmap_io_range, self.server_id, True, start, end)
            steps.append((f"unclaim {start:#x}-{end:#x}", unclaim))
        self.ranges = []
        return steps

    def _moved(self, mapped: tuple[MappedRange, ...]) -> None:
        if self._following:
            self._claim(mapped)

    def _claim(self, wanted: tuple[MappedRange, ...]) -> None:
        sid = self.server_id
        old_base = self.bar0_base
        for r in self.ranges:
            if r not in wanted:
                try:
                    self.platform.unmap_io_range(sid, True, r.start, r.end)
                except XenError as exc:
                    log.warning("cannot unclaim %#x-%#x: %s", r.start, r.end, exc)
        kept = [r for r in self.ranges if r in wanted]
        for r in wanted:
            if r in kept:
                continue
            try:
                self.platform.map_io_range(sid, True, r.start, r.end)
            except XenError as exc:
                # Another server holds part of it (or Xen refused): the guest's accesses there
                # go elsewhere; nothing here can fix a guest that programs overlapping BARs.
                log.error("cannot claim BAR%d at %#x-%#x: %s", r.bar, r.start, r.end, exc)
                continue
            kept.append(r)
        self.ranges = sorted(kept)
        self.bar0_base = next((r.start for r in self.ranges if r.bar == APERTURE_BAR), None)
        if old_base != self.bar0_base:
            self.mapper.bar_moved(old_base, self.bar0_base)
        log.info(
            "claimed MMIO: %s",
            ", ".join(f"BAR{b} {s:#x}-{e:#x}" for s, e, b in self.ranges) or "none",
        )
