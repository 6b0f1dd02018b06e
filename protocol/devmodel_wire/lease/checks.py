"""The validation rules docs/lease-protocol.md states, as functions both sides can share.

They live beside the wire format rather than in the lease engine so that the borrower (which
NACKs bad grants), the lender (which answers bad page-in ranges) and the reference lender in
examples/ apply one reading of the specification. Only rules that need nothing but the message
and the session geometry are here, plus the verdict on a grant's fd from facts about it
(`FdFacts`); asking the kernel for those facts is IO and lives with the borrower
(devmodel.leases.grant_checks). Overlap and lease-count limits depend on the lease table and
stay with the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from devmodel_wire.lease.constants import (
    GRANT_FLAGS_KNOWN,
    GRANULES,
    MIN_APERTURE,
    PROT_WRITE,
    VALID_PROTS,
    NackReason,
)
from devmodel_wire.lease.events import Grant

# Linux's values (open(2) access modes, memfd seals), as fstat and fcntl report them.
O_WRONLY: Final = 0o1
O_RDWR: Final = 0o2
F_SEAL_SHRINK: Final = 0x0002
F_SEAL_WRITE: Final = 0x0008
F_SEAL_FUTURE_WRITE: Final = 0x0010  # since Linux 5.1; the fcntl module does not export it


def geometry_problem(aperture_size: int, granule: int) -> str | None:
    """Why a HELLO's aperture geometry is unacceptable, or None if it is fine."""
    if granule not in GRANULES:
        return f"granule {granule:#x} is not 4 KiB, 2 MiB or 1 GiB"
    if aperture_size < MIN_APERTURE or aperture_size & (aperture_size - 1):
        return f"aperture size {aperture_size:#x} is not a power of two of at least 1 MiB"
    if aperture_size < granule:
        return f"aperture size {aperture_size:#x} is smaller than the granule {granule:#x}"
    return None


def range_problem(offset: int, length: int, *, aperture_size: int, granule: int) -> str | None:
    """Why `[offset, offset + length)` is not a valid window range, or None.

    Used for PAGE_IN ranges; grants go through `check_grant`, which maps the same faults onto
    NACK reasons.
    """
    if length == 0 or offset % granule or length % granule:
        return f"range {offset:#x}+{length:#x} is not a non-empty multiple of {granule:#x}"
    if offset + length > aperture_size:
        return f"range {offset:#x}+{length:#x} ends beyond the aperture ({aperture_size:#x})"
    return None


def check_grant(grant: Grant, *, aperture_size: int, granule: int) -> NackReason | None:
    """The NACK reason for a GRANT's shape (fields only, not the fd), or None if it is sound.

    Protection and flags come first because they decide whether the rest is even meaningful;
    the specification allows any applicable reason when several apply.
    """
    if grant.prot not in VALID_PROTS:
        return NackReason.BAD_PROTECTION
    if grant.flags & ~GRANT_FLAGS_KNOWN:
        return NackReason.UNSUPPORTED_FLAGS
    if (
        grant.length == 0
        or grant.offset % granule
        or grant.length % granule
        or grant.fd_offset % granule
    ):
        return NackReason.MISALIGNED
    if grant.offset + grant.length > aperture_size:
        return NackReason.OUTSIDE_APERTURE
    return None


@dataclass(frozen=True, slots=True)
class FdFacts:
    """What the kernel says about a grant's fd: all `check_fd_facts` needs to judge it."""

    regular: bool
    """A regular file (a memfd is one); nothing else can be mapped as lent memory."""
    access_mode: int
    """The open file's access mode (flags & O_ACCMODE): O_RDONLY, O_WRONLY or O_RDWR."""
    seals: int | None
    """Its seals (F_GET_SEALS); None if the file does not support sealing."""
    size: int


def check_fd_facts(facts: FdFacts, *, fd_offset: int, length: int, prot: int) -> NackReason | None:
    """The NACK reason for a grant's memory fd as `facts` describe it, or None if it is safe
    to map.

    The seal matters more than the size: without F_SEAL_SHRINK the lender could truncate the
    file after the check and every access through an existing mapping would raise SIGBUS in
    the device model.
    """
    if not facts.regular:
        return NackReason.BAD_FD
    if facts.access_mode == O_WRONLY or (prot & PROT_WRITE and facts.access_mode != O_RDWR):
        return NackReason.BAD_FD
    if facts.seals is None or not facts.seals & F_SEAL_SHRINK:
        return NackReason.FD_NOT_SEALED
    if prot & PROT_WRITE and facts.seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
        return NackReason.BAD_FD
    if fd_offset + length > facts.size:
        return NackReason.FD_TOO_SMALL
    return None
