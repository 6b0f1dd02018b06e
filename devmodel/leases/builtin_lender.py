"""The built-in lender: without --lender-socket, devmodel lends itself private memory.

It goes through the same engine as a real lender, so the defaults exercise the whole lease
path: one memfd the size of the aperture (sparse: pages exist once written), sealed against
shrinking, granted as one lease per `chunk`. A page-in re-grants the evicted range from the
same memfd, so contents survive eviction exactly as a real lender must make them survive.
Evictions only happen on request (the control socket's testing aids, or tests).
"""

from __future__ import annotations

import fcntl
import os

from devmodel.leases.backing import F_SEAL_SHRINK
from devmodel.leases.engine import LeaseEngine
from devmodel_wire.lease.constants import PROT_READ, PROT_WRITE, Access, PageInStatus

F_ADD_SEALS: int = getattr(fcntl, "F_ADD_SEALS", 1033)
F_SEAL_GROW: int = getattr(fcntl, "F_SEAL_GROW", 0x0004)


class BuiltinLender:
    answers_later = False  # it grants inside send_page_in (LenderPort)

    def __init__(self, engine: LeaseEngine, chunk: int | None = None) -> None:
        self.engine = engine
        self.chunk = chunk or engine.size
        self._fd = os.memfd_create("devmodel-builtin-lender", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self._fd, engine.size)
        fcntl.fcntl(self._fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)
        self._next_lease = 1
        engine.port = self

    def lend_everything(self) -> None:
        for offset in range(0, self.engine.size, self.chunk):
            self._grant(offset, min(self.chunk, self.engine.size - offset))

    def _grant(self, offset: int, length: int) -> int:
        lease = self._next_lease
        self._next_lease += 1
        self.engine.grant(lease, offset, length, offset, PROT_READ | PROT_WRITE, os.dup(self._fd))
        return lease

    def send_page_in(self, request_id: int, offset: int, length: int, access: Access) -> bool:
        self._grant(offset, length)
        self.engine.page_in_done(request_id, PageInStatus.OK)
        return True

    def close(self) -> None:
        os.close(self._fd)
