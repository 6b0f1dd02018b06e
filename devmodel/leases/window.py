"""A window: one granule-aligned range of the aperture with one state and its waiting accesses."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from devmodel.leases.dmabuf import DmabufMapping
from devmodel.leases.states import WindowState


@dataclass(slots=True, eq=False)
class Pending:
    """An access waiting on a window (REVOKING or PAGING_IN).

    When a grant makes its window resident the engine performs the access *right there*, before
    anything else can run, and stores the result: that is the forward-progress guarantee (a
    revoke that follows the grant cannot complete before the waiters were served).
    """

    offset: int
    size: int
    data: bytes | None  # None for a read
    done: trio.Event = field(default_factory=trio.Event)
    served: bool = False
    result: bytes = b""
    # The failure policy's error for a served access, raised in the access's own task: the
    # grant that served it must not raise it into the lender's GRANT.
    error: Exception | None = None
    # Woken without being served: look at the window again (a revoke finished).
    retry: bool = False


@dataclass(slots=True, eq=False)
class Window:
    start: int
    length: int
    state: WindowState
    # The fields a resident access reads come first (state above, then these), so that with
    # a million windows an access touches one or two cache lines of its window, not three.
    fd: int = -1
    # Where aperture offset 0 would be in `fd`: an access at `offset` is at fd_base + offset.
    # One int instead of fd_offset and start: a lender that lends at fd offset = aperture
    # offset (the usual way) makes it 0, a small int that no access has to fetch from memory.
    fd_base: int = 0
    # A dma-buf lease's mapping (it cannot be read with pread); None for a memfd lease.
    mem: DmabufMapping | None = None
    prot: int = 0
    lease_id: int = 0
    request_id: int = 0  # the PAGE_IN this window waits on (PAGING_IN)
    # Accesses waiting on the window; None while there are none, which is nearly always: an
    # empty list per window would be 56 of the ~220 bytes a lease costs at a million leases.
    waiters: list[Pending] | None = None

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def fd_offset(self) -> int:
        """The lease's offset in `fd` (its GRANT's fd_offset) for a granted window."""
        return self.fd_base + self.start

    def wait(self, pending: Pending) -> None:
        """Queue `pending` on the window (in arrival order)."""
        if self.waiters is None:
            self.waiters = [pending]
        else:
            self.waiters.append(pending)

    def take_waiters(self, start: int, end: int) -> list[Pending]:
        """Remove and return the waiters whose access lies in [start, end)."""
        waiters = self.waiters
        if not waiters:
            return []
        # One pass, no comprehensions: a grant takes the waiters of a fault this way while the
        # guest waits for it, and a comprehension is a call of its own.
        inside: list[Pending] = []
        rest: list[Pending] = []
        for p in waiters:
            if start <= p.offset < end:
                inside.append(p)
            else:
                rest.append(p)
        if inside:
            self.waiters = rest or None
        return inside
