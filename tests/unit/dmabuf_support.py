"""A memfd standing in for a dma-buf, for the tests that run without udmabuf (no tests here).

The engine reaches dma-bufs only through `DmabufSupport` (an inspector and a sync call), so a
memfd, which can be mapped shared like a dma-buf, plays one once the inspector names it an
allowed exporter and the sync call is a recorder. What this cannot show is the kernel's side
(fdinfo, lseek, the real ioctl): tests/udmabuf/ checks that on a kernel with udmabuf.
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass, field

from devmodel.leases.dmabuf import DmabufSupport
from devmodel_wire.lease.checks import DmabufFacts


@dataclass
class SyncLog:
    """Records every DMA_BUF_IOCTL_SYNC as (fd, flags); fails the flags in `failing`."""

    calls: list[tuple[int, int]] = field(default_factory=list)
    failing: set[int] = field(default_factory=set)

    def __call__(self, fd: int, flags: int) -> None:
        self.calls.append((fd, flags))
        if flags in self.failing:
            raise OSError(errno.EIO, "the exporter failed the sync")

    @property
    def flags(self) -> list[int]:
        return [f for _, f in self.calls]


def fake_dmabuf_support(log: SyncLog, exporter: str | None = "udmabuf") -> DmabufSupport:
    """A support that takes any mappable fd for a dma-buf exported by `exporter`."""

    def inspect(fd: int) -> DmabufFacts | None:
        try:
            mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
            size = os.fstat(fd).st_size
        except OSError:
            return None
        return DmabufFacts(exporter, mode, size)

    return DmabufSupport(inspect=inspect, sync=log)
