"""The check of a grant's memory fd: the facts asked of the kernel, the verdict the protocol's.

devmodel_wire.lease.checks judges an fd from `FdFacts` and never touches it (protocol/ does no
IO); this module asks fstat and fcntl for those facts.
"""

from __future__ import annotations

import fcntl
import os
import stat

from devmodel.leases.backing import FdKey
from devmodel.leases.dmabuf import DmabufSupport
from devmodel_wire.lease.checks import FdFacts, check_dmabuf_facts, check_fd_facts
from devmodel_wire.lease.constants import FdKind, NackReason


def check_grant_fd(
    fd: int,
    *,
    fd_offset: int,
    length: int,
    prot: int,
    kind: int = FdKind.MEMFD,
    dmabuf: DmabufSupport | None = None,
) -> NackReason | None:
    """The NACK reason for a grant's memory fd, or None if it is safe to map."""
    return check_grant_fd_key(
        fd, fd_offset=fd_offset, length=length, prot=prot, kind=kind, dmabuf=dmabuf
    )[0]


def check_grant_fd_key(
    fd: int,
    *,
    fd_offset: int,
    length: int,
    prot: int,
    kind: int = FdKind.MEMFD,
    dmabuf: DmabufSupport | None = None,
) -> tuple[NackReason | None, FdKey | None]:
    """`check_grant_fd`, and for an fd it accepts, the key `FdStore.adopt` files it under.

    One fstat, one F_GETFL, one F_GET_SEALS per GRANT: handing the key to `LeaseEngine.grant`
    spares the store asking the same again. `check_fd_facts` is at least as strict as the
    store's own check (it requires the shrink seal, which the store lets a plain file go
    without, and the page alignment of fd_offset follows from the granule's, which the
    connection checked first).
    """
    if kind == FdKind.DMABUF:
        return _check_dmabuf_key(fd, fd_offset, length, prot, dmabuf or DmabufSupport())
    # The facts asked here, not in a helper: this runs inside every fault's wait.
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        return NackReason.BAD_FD, None
    seals: int | None
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = None
    mode = flags & os.O_ACCMODE
    facts = FdFacts(stat.S_ISREG(st.st_mode), mode, seals, st.st_size)
    reason = check_fd_facts(facts, fd_offset=fd_offset, length=length, prot=prot)
    return reason, ((st.st_dev, st.st_ino, mode) if reason is None else None)


def _check_dmabuf_key(
    fd: int, fd_offset: int, length: int, prot: int, dmabuf: DmabufSupport
) -> tuple[NackReason | None, FdKey | None]:
    """A dma-buf grant's fd: fstat (for the key), its exporter (fdinfo) and size (lseek), by
    `dmabuf.inspect`; `check_dmabuf_facts` judges. Mapping it is the engine's last check."""
    try:
        st = os.fstat(fd)
    except OSError:
        return NackReason.BAD_FD, None
    facts = dmabuf.inspect(fd)
    if facts is None:
        return NackReason.BAD_FD, None
    reason = check_dmabuf_facts(
        facts, fd_offset=fd_offset, length=length, prot=prot, exporters=dmabuf.exporters
    )
    if reason is not None:
        return reason, None
    return None, (st.st_dev, st.st_ino, facts.access_mode)
