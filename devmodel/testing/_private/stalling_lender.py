"""A lender that never answers a page-in: the guest-visible worst case of a stuck lender.

It lends the whole aperture, one lease per granule, from one sealed memfd; evicts the windows
it was asked to evict as soon as the borrower has acknowledged every grant; and then records
every PAGE_IN and answers none of them. PINGs are answered (by `ThreadedLender`), so the
borrower's keepalive keeps the session up and the only thing wrong is the missing page-in answer.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import devmodel_wire.lease as lp
from devmodel.testing._private.fds import memfd
from devmodel.testing._private.threaded_lender import ThreadedLender

PROT_READ_WRITE = 3


class StallingLender(ThreadedLender):
    """Serves one borrower on `path`; windows listed in `evict` (granule indexes) are evicted
    right after the grants and their page-ins are never answered."""

    name = "stalling-lender"

    def __init__(self, path: Path, evict: tuple[int, ...] = (1,)) -> None:
        self.evict = evict
        self.acked: set[int] = set()
        self.nacked: list[lp.GrantNack] = []
        self.revoked: set[int] = set()
        self.page_ins: list[tuple[float, lp.PageIn]] = []
        self.evicted = threading.Event()  # every window in `evict` is REVOKED
        self._lease_of_window: dict[int, int] = {}
        self._memfd: int | None = None
        super().__init__(path)

    def handle(self, event: lp.Event) -> None:
        if isinstance(event, lp.Hello):
            self._memfd = memfd(event.aperture_size, "stalling-lender")
            for window in range(event.aperture_size // event.granule):
                lease = window + 1
                self._lease_of_window[window] = lease
                offset = window * event.granule
                self.send(
                    lp.Grant(
                        lease_id=lease,
                        offset=offset,
                        length=event.granule,
                        fd_offset=offset,
                        prot=PROT_READ_WRITE,
                        fd=self._memfd,
                    )
                )
        elif isinstance(event, lp.GrantAck):
            self.acked.add(event.lease_id)
            if len(self.acked) == len(self._lease_of_window):
                for window in self.evict:
                    self.send(lp.Revoke(self._lease_of_window[window], lp.RevokeMode.EVICT))
        elif isinstance(event, lp.GrantNack):
            self.nacked.append(event)
        elif isinstance(event, lp.Revoked):
            self.revoked.add(event.lease_id)
            if {self._lease_of_window[w] for w in self.evict} <= self.revoked:
                self.evicted.set()
        elif isinstance(event, lp.PageIn):
            self.page_ins.append((time.monotonic(), event))  # and never answered

    def session_ended(self) -> None:
        if self._memfd is not None:
            os.close(self._memfd)
            self._memfd = None
