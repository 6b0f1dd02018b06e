"""The check of a grant's memory fd: the facts asked of the kernel, the verdict the protocol's.

devmodel_wire.lease.checks judges an fd from `FdFacts` and never touches it (protocol/ does no
IO); this module asks fstat and fcntl for those facts.
"""

from __future__ import annotations

import fcntl
import os
import stat

from devmodel_wire.lease.checks import FdFacts, check_fd_facts
from devmodel_wire.lease.constants import NackReason


def fd_facts(fd: int) -> FdFacts | None:
    """What `check_fd_facts` needs to know about `fd`; None if it is not an open fd."""
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        return None
    seals: int | None
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = None
    return FdFacts(stat.S_ISREG(st.st_mode), flags & os.O_ACCMODE, seals, st.st_size)


def check_grant_fd(fd: int, *, fd_offset: int, length: int, prot: int) -> NackReason | None:
    """The NACK reason for a grant's memory fd, or None if it is safe to map."""
    facts = fd_facts(fd)
    if facts is None:
        return NackReason.BAD_FD
    return check_fd_facts(facts, fd_offset=fd_offset, length=length, prot=prot)
