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

from typing import TYPE_CHECKING, Final

from devmodel_wire.lease.constants import (
    FD_KIND_FEATURE,
    GRANT_FD_KIND_MASK,
    GRANT_FLAGS_KNOWN,
    GRANULES,
    MIN_APERTURE,
    PROT_WRITE,
    VALID_PROTS,
    NackReason,
)
from pyvfio_user.frozen import frozen

if TYPE_CHECKING:
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


def fd_kind_problem(flags: int, features: int) -> str | None:
    """Why a GRANT's `flags` are not acceptable in a session that agreed on `features`
    (unknown bits, an unknown fd kind, or a kind whose feature was not agreed), or None."""
    if flags & ~GRANT_FLAGS_KNOWN:
        return f"grant flags {flags:#x} have bits outside the fd kind"
    kind = flags & GRANT_FD_KIND_MASK
    needs = FD_KIND_FEATURE.get(kind)
    if needs is None:
        return f"fd kind {kind} is unknown"
    if needs & ~features:
        return f"fd kind {kind} needs feature {needs:#x}, which the session did not agree on"
    return None


def check_grant(
    grant: Grant, *, aperture_size: int, granule: int, features: int = 0
) -> NackReason | None:
    """The NACK reason for a GRANT's shape (fields only, not the fd), or None if it is sound.

    `features` is what the session agreed on: a dma-buf grant needs `dmabuf-grants`.
    Protection and flags come first because they decide whether the rest is even meaningful;
    the specification allows any applicable reason when several apply.
    """
    if grant.prot not in VALID_PROTS:
        return NackReason.BAD_PROTECTION
    if fd_kind_problem(grant.flags, features) is not None:
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


@frozen
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


DMABUF_EXPORTERS: Final = frozenset({"udmabuf"})
"""Exporters whose dma-bufs a borrower accepts by default (docs/lease-protocol.md 5.1): their
pages cannot disappear under a mapping while the borrower holds the fd (udmabuf pins the
memfd pages it was made from), so touching the mapping cannot raise SIGBUS."""


@frozen
class DmabufFacts:
    """What the kernel says about a dma-buf grant's fd: all `check_dmabuf_facts` needs."""

    exporter: str | None
    """The exporter's name (`exp_name:` in /proc/self/fdinfo); None when the kernel shows
    none, which is also what a file that is no dma-buf looks like."""
    access_mode: int
    """The open file's access mode (flags & O_ACCMODE)."""
    size: int | None
    """The buffer's size (lseek SEEK_END); None if the fd cannot seek."""


def check_dmabuf_facts(
    facts: DmabufFacts,
    *,
    fd_offset: int,
    length: int,
    prot: int,
    exporters: frozenset[str] = DMABUF_EXPORTERS,
) -> NackReason | None:
    """The NACK reason for a dma-buf grant's fd as `facts` describe it, or None.

    The exporter decides whether mapping the buffer is safe at all: an exporter that may take
    pages away under a mapping (a driver moving VRAM without a fault handler to follow it, a
    device unplugged) makes the next access raise SIGBUS in the borrower. So only exporters in
    `exporters` are accepted, and a buffer whose exporter cannot be named is refused.
    """
    if facts.exporter is None or facts.exporter not in exporters:
        return NackReason.BAD_FD
    if facts.access_mode == O_WRONLY or (prot & PROT_WRITE and facts.access_mode != O_RDWR):
        return NackReason.BAD_FD
    if facts.size is None:
        return NackReason.BAD_FD
    if fd_offset + length > facts.size:
        return NackReason.FD_TOO_SMALL
    return None
