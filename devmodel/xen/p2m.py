"""The seam for the lending hypercall: which BAR0 windows are mapped into the guest's p2m.

Today none are (`EmulateEverything`): every BAR0 access traps and is served by the lease engine.
The protocol is here so that a mapper for the proposed hypercall plugs in without touching the
request path or the BAR claiming.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["EmulateEverything", "P2mMapper"]


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
